//! Fault injection on the Kinesis side: [`FaultInjector`], an SDK interceptor that
//! replaces chosen responses with Kinesis errors (or crafted bodies), one-shot or
//! sticky, per operation or per shard; and [`HangingHttpClient`], an HTTP client whose
//! chosen requests never complete, for timeouts and cancellation.
//!
//! The emulators never throttle, never fail internally and never stall, so these are the
//! only way a test reaches those paths; everything else still goes over the wire.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::bail;
use aws_smithy_runtime_api::client::http::{
    HttpClient, HttpConnector, HttpConnectorFuture, HttpConnectorSettings, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_runtime_api::client::runtime_components::{RuntimeComponents, RuntimeComponentsBuilder};
use aws_smithy_types::config_bag::{ConfigBag, Storable, StoreReplace};
use tokio::sync::Notify;

/// A fault to inject into a Kinesis response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// HTTP 400 `ProvisionedThroughputExceededException`.
    Throttle,
    /// HTTP 400 `ExpiredIteratorException`.
    ExpiredIterator,
    /// HTTP 400 `ResourceNotFoundException`.
    ResourceNotFound,
    /// HTTP 400 `InvalidArgumentException`.
    InvalidArgument,
    /// HTTP 500 `InternalFailure` whose `message` is the given text (so a test can look
    /// for it in logs or error messages).
    InternalFailure(String),
    /// HTTP 200 with this JSON body (`application/x-amz-json-1.1`): a crafted successful
    /// response, e.g. a `GetRecords` output with a record the library must reject.
    Body(String),
    /// HTTP 400 with this error type (`ResourceInUseException`, `LimitExceededException`,
    /// `UnknownOperationException`, ...).
    Error(&'static str),
    /// HTTP 400 with this error type and message (Kinesis tells some refusals apart only
    /// by their message, such as the `InvalidArgumentException`s of `GetShardIterator`).
    ErrorMessage(&'static str, String),
    /// HTTP 200 `application/vnd.amazon.eventstream` with these messages, then the end
    /// of the stream: a crafted `SubscribeToShard` subscription.
    EventStream(Vec<StreamMessage>),
}

/// One message of a crafted event stream ([`Fault::EventStream`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StreamMessage {
    /// A `SubscribeToShardEvent` with this JSON payload (`Records`,
    /// `ContinuationSequenceNumber`, `MillisBehindLatest`, ...).
    Event(String),
    /// An exception in the stream (`KMSAccessDeniedException`, `InternalFailureException`,
    /// ...), with its message.
    Exception(&'static str, String),
}

impl StreamMessage {
    /// The message in the event-stream wire format (`application/vnd.amazon.eventstream`):
    /// prelude (total and header lengths, CRC32), string headers, payload, CRC32.
    fn encode(&self) -> Vec<u8> {
        let (headers, payload): (Vec<(&str, &str)>, String) = match self {
            Self::Event(payload) => (
                vec![
                    (":message-type", "event"),
                    (":event-type", "SubscribeToShardEvent"),
                    (":content-type", "application/json"),
                ],
                payload.clone(),
            ),
            Self::Exception(exception_type, message) => (
                vec![
                    (":message-type", "exception"),
                    (":exception-type", exception_type),
                    (":content-type", "application/json"),
                ],
                format!(r#"{{"message":{}}}"#, json_string(message)),
            ),
        };
        let mut header_bytes = Vec::new();
        for (name, value) in headers {
            header_bytes.push(name.len() as u8);
            header_bytes.extend_from_slice(name.as_bytes());
            header_bytes.push(7); // string
            header_bytes.extend_from_slice(&(value.len() as u16).to_be_bytes());
            header_bytes.extend_from_slice(value.as_bytes());
        }
        let total = 12 + header_bytes.len() + payload.len() + 4;
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&(total as u32).to_be_bytes());
        out.extend_from_slice(&(header_bytes.len() as u32).to_be_bytes());
        let prelude_crc = crc32(&out);
        out.extend_from_slice(&prelude_crc.to_be_bytes());
        out.extend_from_slice(&header_bytes);
        out.extend_from_slice(payload.as_bytes());
        let message_crc = crc32(&out);
        out.extend_from_slice(&message_crc.to_be_bytes());
        out
    }
}

/// CRC-32 (IEEE), as the event-stream framing uses.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

impl Fault {
    /// The HTTP status, content type and body of the response that replaces the real one.
    fn response(&self) -> (u16, &'static str, Vec<u8>) {
        const JSON: &str = "application/x-amz-json-1.1";
        match self {
            Self::EventStream(messages) => (
                200,
                "application/vnd.amazon.eventstream",
                messages.iter().flat_map(StreamMessage::encode).collect(),
            ),
            other => {
                let (status, body) = other.json_response();
                (status, JSON, body.into_bytes())
            }
        }
    }

    /// The HTTP status and JSON body of every fault but an event stream.
    fn json_response(&self) -> (u16, String) {
        let error = |error_type: &str, message: &str| {
            format!(r#"{{"__type":"{error_type}","message":{}}}"#, json_string(message))
        };
        const MESSAGE: &str = "injected by the test";
        match self {
            Self::Throttle => (400, error("ProvisionedThroughputExceededException", MESSAGE)),
            Self::ExpiredIterator => (400, error("ExpiredIteratorException", MESSAGE)),
            Self::ResourceNotFound => (400, error("ResourceNotFoundException", MESSAGE)),
            Self::InvalidArgument => (400, error("InvalidArgumentException", MESSAGE)),
            Self::InternalFailure(message) => (500, error("InternalFailure", message)),
            Self::Body(body) => (200, body.clone()),
            Self::Error(error_type) => (400, error(error_type, MESSAGE)),
            Self::ErrorMessage(error_type, message) => (400, error(error_type, message)),
            Self::EventStream(_) => (200, String::new()),
        }
    }
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Which requests a fault applies to.
#[derive(Clone, Debug)]
struct Rule {
    operation: &'static str,
    /// `None`: every request of the operation.
    shard_id: Option<String>,
    fault: Fault,
}

impl Rule {
    fn matches(&self, operation: &str, shard_id: Option<&str>) -> bool {
        self.operation == operation && self.shard_id.as_deref().is_none_or(|s| Some(s) == shard_id)
    }
}

#[derive(Debug, Default)]
struct InjectorState {
    /// One-shot faults, in the order queued.
    queue: VecDeque<Rule>,
    /// Faults applied until cleared, in the order set.
    sticky: Vec<Rule>,
    /// What was injected, in order.
    injected: Vec<(&'static str, Fault)>,
    /// Requests sent, per operation.
    calls: BTreeMap<String, usize>,
    /// `SubscribeToShard` requests rewritten to start at `TRIM_HORIZON`.
    replay: bool,
}

impl InjectorState {
    /// The fault for a response of `operation` to a request naming `shard_id`, if any:
    /// the first queued fault that matches (consumed), else a sticky one (a shard's
    /// over the operation's, the latest set first).
    fn take(&mut self, operation: &str, shard_id: Option<&str>) -> Option<(&'static str, Fault)> {
        if let Some(i) = self.queue.iter().position(|r| r.matches(operation, shard_id)) {
            return self.queue.remove(i).map(|r| (r.operation, r.fault));
        }
        let sticky = self.sticky.iter().rev();
        let for_shard = sticky
            .clone()
            .find(|r| r.shard_id.is_some() && r.matches(operation, shard_id));
        for_shard
            .or_else(|| {
                sticky
                    .clone()
                    .find(|r| r.shard_id.is_none() && r.matches(operation, shard_id))
            })
            .map(|r| (r.operation, r.fault.clone()))
    }
}

/// The `ShardId` a request named, stashed in the config bag before transmission for
/// the response hook (the request is gone by then).
#[derive(Clone, Debug)]
struct RequestShard(Option<String>);

impl Storable for RequestShard {
    type Storer = StoreReplace<Self>;
}

/// The value of the first `"ShardId":"..."` member of a JSON request body.
fn shard_id_of(body: &[u8]) -> Option<String> {
    const KEY: &str = r#""ShardId":""#;
    let body = std::str::from_utf8(body).ok()?;
    let start = body.find(KEY)? + KEY.len();
    let len = body.get(start..)?.find('"')?;
    body.get(start..start + len).map(str::to_owned)
}

/// An SDK interceptor that replaces the responses of chosen Kinesis operations with
/// injected faults, and records what it injected.
///
/// One-shot faults ([`push`](Self::push), [`push_for_shard`](Self::push_for_shard)) are
/// queued: a response gets the first queued fault that matches its request (entries for
/// other operations or shards stay queued and do not block it). Sticky faults
/// ([`set_sticky`](Self::set_sticky)) apply to every matching response until cleared;
/// a matching one-shot fault takes precedence.
///
/// The request still reaches the backend (whatever it does there happens); only the
/// response the SDK sees is replaced.
#[derive(Debug, Clone, Default)]
pub struct FaultInjector {
    state: Arc<Mutex<InjectorState>>,
    changed: Arc<Notify>,
}

impl FaultInjector {
    fn state(&self) -> MutexGuard<'_, InjectorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `fault` for the next response of `operation` (e.g. `"GetRecords"`).
    pub fn push(&self, operation: &'static str, fault: Fault) {
        self.state().queue.push_back(Rule {
            operation,
            shard_id: None,
            fault,
        });
    }

    /// Queues `fault` for the next response of `operation` to a request for `shard_id`:
    /// one whose JSON body has `"ShardId":"<shard_id>"` (`GetShardIterator`,
    /// `DescribeStreamConsumer`-style requests; not `GetRecords`, which names an
    /// iterator). Requests for other shards pass untouched and leave it queued.
    pub fn push_for_shard(&self, operation: &'static str, shard_id: &str, fault: Fault) {
        self.state().queue.push_back(Rule {
            operation,
            shard_id: Some(shard_id.to_owned()),
            fault,
        });
    }

    /// Injects `fault` into every response of `operation` (to requests for `shard_id`,
    /// when given, matched as in [`push_for_shard`](Self::push_for_shard)) until
    /// [`clear_sticky`](Self::clear_sticky). Replaces a sticky fault set before for the
    /// same operation and shard. Queued faults take precedence.
    pub fn set_sticky(&self, operation: &'static str, shard_id: Option<&str>, fault: Fault) {
        let mut state = self.state();
        state
            .sticky
            .retain(|r| !(r.operation == operation && r.shard_id.as_deref() == shard_id));
        state.sticky.push(Rule {
            operation,
            shard_id: shard_id.map(str::to_owned),
            fault,
        });
    }

    /// Removes every sticky fault of `operation` (for all shards).
    pub fn clear_sticky(&self, operation: &str) {
        self.state().sticky.retain(|r| r.operation != operation);
    }

    /// How many requests of `operation` (e.g. `"SubscribeToShard"`) clients with this
    /// injector sent so far, faulted or not.
    pub fn calls(&self, operation: &str) -> usize {
        self.state().calls.get(operation).copied().unwrap_or(0)
    }

    /// Waits until clients with this injector sent at least `n` requests of
    /// `operation`; fails after `timeout`.
    pub async fn wait_calls(&self, operation: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.calls(operation) >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!(
                    "timed out after {timeout:?} waiting for {n} {operation} requests: {} so far",
                    self.calls(operation)
                );
            }
        }
    }

    /// Makes every `SubscribeToShard` request start at `TRIM_HORIZON`, whatever position
    /// it asked for: a backend that replays from an earlier position than requested.
    pub fn replay_subscriptions_from_trim_horizon(&self, on: bool) {
        self.state().replay = on;
    }

    /// What was injected so far, in order.
    pub fn injected(&self) -> Vec<(&'static str, Fault)> {
        self.state().injected.clone()
    }

    /// Waits until at least `n` faults were injected into responses of `operation`;
    /// fails after `timeout`.
    pub async fn wait_injected(&self, operation: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let count = || self.state().injected.iter().filter(|(op, _)| *op == operation).count();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if count() >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!(
                    "timed out after {timeout:?} waiting for {n} faults injected into {operation}: {} so far ({:?})",
                    count(),
                    self.injected()
                );
            }
        }
    }

    /// A Kinesis client on `config` with this injector and without SDK retries, so
    /// that the library's own retry and recovery are what the test exercises.
    pub fn client(&self, config: &aws_types::SdkConfig) -> aws_sdk_kinesis::Client {
        let conf = aws_sdk_kinesis::config::Builder::from(config)
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled())
            .interceptor(self.clone())
            .build();
        aws_sdk_kinesis::Client::from_conf(conf)
    }
}

impl aws_sdk_kinesis::config::Intercept for FaultInjector {
    fn name(&self) -> &'static str {
        "FaultInjector"
    }

    fn modify_before_signing(
        &self,
        context: &mut aws_sdk_kinesis::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        let subscribe = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .is_some_and(|m| m.name() == "SubscribeToShard");
        if !subscribe || !self.state().replay {
            return Ok(());
        }
        let request = context.request_mut();
        let Some(body) = request.body().bytes() else {
            return Ok(());
        };
        let mut json: serde_json::Value = serde_json::from_slice(body)?;
        json["StartingPosition"] = serde_json::json!({ "Type": "TRIM_HORIZON" });
        let bytes = serde_json::to_vec(&json)?;
        request.headers_mut().insert("content-length", bytes.len().to_string());
        *request.body_mut() = aws_smithy_types::body::SdkBody::from(bytes);
        Ok(())
    }

    fn read_before_transmit(
        &self,
        context: &aws_sdk_kinesis::config::interceptors::BeforeTransmitInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        let shard_id = context.request().body().bytes().and_then(shard_id_of);
        cfg.interceptor_state().store_put(RequestShard(shard_id));
        if let Some(operation) = cfg.load::<aws_smithy_runtime_api::client::orchestrator::Metadata>() {
            *self.state().calls.entry(operation.name().to_owned()).or_default() += 1;
            self.changed.notify_waiters();
        }
        Ok(())
    }

    fn modify_before_deserialization(
        &self,
        context: &mut aws_sdk_kinesis::config::interceptors::BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), aws_sdk_kinesis::error::BoxError> {
        let Some(operation) = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map(|m| m.name().to_owned())
        else {
            return Ok(());
        };
        let shard_id = cfg.load::<RequestShard>().and_then(|s| s.0.clone());
        let Some((op, fault)) = self.state().take(&operation, shard_id.as_deref()) else {
            return Ok(());
        };
        let (status, content_type, body) = fault.response();
        let mut response = aws_smithy_runtime_api::http::Response::new(
            aws_smithy_runtime_api::http::StatusCode::try_from(status)?,
            aws_smithy_types::body::SdkBody::from(body),
        );
        response.headers_mut().insert("content-type", content_type);
        *context.response_mut() = response;
        self.state().injected.push((op, fault));
        self.changed.notify_waiters();
        Ok(())
    }
}

#[derive(Debug, Default)]
struct HangCounts {
    /// Requests still to hang, per operation.
    remaining: BTreeMap<String, usize>,
    /// Requests hung so far, per operation.
    hung: BTreeMap<String, usize>,
}

#[derive(Debug, Default)]
struct HangState {
    counts: Mutex<HangCounts>,
    changed: Notify,
}

impl HangState {
    fn counts(&self) -> MutexGuard<'_, HangCounts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `request` is to hang (and if so, counts it).
    fn take(&self, request: &HttpRequest) -> bool {
        let Some(target) = request.headers().get("x-amz-target") else {
            return false;
        };
        let mut counts = self.counts();
        let Some((operation, remaining)) = counts
            .remaining
            .iter_mut()
            .find(|(op, n)| **n > 0 && target.ends_with(&format!(".{op}")))
        else {
            return false;
        };
        *remaining -= 1;
        let operation = operation.clone();
        *counts.hung.entry(operation).or_default() += 1;
        drop(counts);
        self.changed.notify_waiters();
        true
    }
}

/// An HTTP client that wraps an SDK config's client (or the SDK's default one) and
/// makes chosen requests hang forever: after [`hang_next`](Self::hang_next)`(op, n)`,
/// the next `n` requests whose `X-Amz-Target` header ends with `.<op>` (e.g.
/// `Kinesis_20131202.GetRecords`, `DynamoDB_20120810.GetItem`) are sent to the server
/// but never complete (the answer is lost); everything else goes through. The caller's own timeout (or
/// cancellation) is what ends such a call.
#[derive(Debug, Clone)]
pub struct HangingHttpClient {
    inner: SharedHttpClient,
    state: Arc<HangState>,
}

impl HangingHttpClient {
    /// Wraps `config`'s HTTP client; when it has none (as the configs of
    /// `kcl_local::sdk_config_for_endpoint` do not), the SDK's default HTTPS client
    /// (hyper 1.x, rustls on aws-lc), which also speaks plain HTTP.
    pub fn new(config: &aws_types::SdkConfig) -> Self {
        let inner = config.http_client().unwrap_or_else(|| {
            aws_smithy_http_client::Builder::new()
                .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                    aws_smithy_http_client::tls::rustls_provider::CryptoMode::AwsLc,
                ))
                .build_https()
        });
        Self {
            inner,
            state: Arc::default(),
        }
    }

    /// Makes the next `n` requests of `operation` (e.g. `"GetRecords"`) hang, on top of
    /// any still pending from an earlier call.
    pub fn hang_next(&self, operation: &str, n: usize) {
        *self.state.counts().remaining.entry(operation.to_owned()).or_default() += n;
    }

    /// How many requests of `operation` were hung so far.
    pub fn hanging(&self, operation: &str) -> usize {
        self.state.counts().hung.get(operation).copied().unwrap_or(0)
    }

    /// Waits until at least `n` requests of `operation` were hung; fails after
    /// `timeout`.
    pub async fn wait_hung(&self, operation: &str, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.state.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.hanging(operation) >= n {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                bail!(
                    "timed out after {timeout:?} waiting for {n} hung {operation} requests: {} so far",
                    self.hanging(operation)
                );
            }
        }
    }

    /// A Kinesis client on `config` with this HTTP client, without SDK retries, and
    /// with `injector` when given.
    pub fn kinesis_client(
        &self,
        config: &aws_types::SdkConfig,
        injector: Option<&FaultInjector>,
    ) -> aws_sdk_kinesis::Client {
        let mut conf = aws_sdk_kinesis::config::Builder::from(config)
            .http_client(self.clone())
            .retry_config(aws_sdk_kinesis::config::retry::RetryConfig::disabled());
        if let Some(injector) = injector {
            conf = conf.interceptor(injector.clone());
        }
        aws_sdk_kinesis::Client::from_conf(conf.build())
    }

    /// A DynamoDB client on `config` with this HTTP client and without SDK retries.
    pub fn dynamodb_client(&self, config: &aws_types::SdkConfig) -> aws_sdk_dynamodb::Client {
        let conf = aws_sdk_dynamodb::config::Builder::from(config)
            .http_client(self.clone())
            .retry_config(aws_sdk_dynamodb::config::retry::RetryConfig::disabled())
            .build();
        aws_sdk_dynamodb::Client::from_conf(conf)
    }
}

impl HttpClient for HangingHttpClient {
    fn http_connector(&self, settings: &HttpConnectorSettings, components: &RuntimeComponents) -> SharedHttpConnector {
        SharedHttpConnector::new(HangingConnector {
            inner: self.inner.http_connector(settings, components),
            state: self.state.clone(),
        })
    }

    fn validate_base_client_config(
        &self,
        runtime_components: &RuntimeComponentsBuilder,
        cfg: &ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.inner.validate_base_client_config(runtime_components, cfg)
    }

    fn validate_final_config(
        &self,
        runtime_components: &RuntimeComponents,
        cfg: &ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        self.inner.validate_final_config(runtime_components, cfg)
    }

    fn connector_metadata(&self) -> Option<aws_smithy_runtime_api::client::connector_metadata::ConnectorMetadata> {
        self.inner.connector_metadata()
    }
}

#[derive(Debug)]
struct HangingConnector {
    inner: SharedHttpConnector,
    state: Arc<HangState>,
}

impl HttpConnector for HangingConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        if self.state.take(&request) {
            // Sent and answered by the server, but the answer never arrives: the case
            // only a client-side timeout ends (the request body was fully read, so the
            // SDK's stalled-stream protection does not step in).
            let sent = self.inner.call(request);
            return HttpConnectorFuture::new(async move {
                let _ = sent.await;
                std::future::pending::<Result<HttpResponse, ConnectorError>>().await
            });
        }
        self.inner.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;
    use aws_sdk_kinesis::error::DisplayErrorContext;
    use aws_sdk_kinesis::types::ShardIteratorType;
    use kcl_local::LocalBackend;

    #[test]
    fn crc32_is_the_ieee_checksum() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    async fn stream(backend: &LocalBackend) -> anyhow::Result<Vec<String>> {
        let client = backend.kinesis_client();
        kcl_local::create_stream(&client, "s", 2).await?;
        let shards = client.list_shards().stream_name("s").send().await?;
        Ok(shards.shards().iter().map(|s| s.shard_id().to_owned()).collect())
    }

    async fn iterator(
        client: &aws_sdk_kinesis::Client,
        shard_id: &str,
    ) -> Result<
        aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorOutput,
        aws_sdk_kinesis::error::SdkError<aws_sdk_kinesis::operation::get_shard_iterator::GetShardIteratorError>,
    > {
        client
            .get_shard_iterator()
            .stream_name("s")
            .shard_id(shard_id)
            .shard_iterator_type(ShardIteratorType::TrimHorizon)
            .send()
            .await
    }

    #[test]
    fn shard_id_is_read_from_the_request_body() {
        let body = br#"{"StreamName":"s","ShardId":"shardId-000000000001","ShardIteratorType":"LATEST"}"#;
        assert_eq!(shard_id_of(body).as_deref(), Some("shardId-000000000001"));
        assert_eq!(shard_id_of(br#"{"ExclusiveStartShardId":"shardId-0"}"#), None);
    }

    #[test]
    fn messages_are_json_escaped() {
        let (status, body) = Fault::InternalFailure("a \"b\"\\\n".into()).json_response();
        assert_eq!(status, 500);
        assert_eq!(body, r#"{"__type":"InternalFailure","message":"a \"b\"\\\n"}"#);
    }

    #[tokio::test]
    async fn a_fault_for_a_shard_hits_only_that_shard_and_does_not_block_others() -> anyhow::Result<()> {
        let backend = LocalBackend::start().await?;
        let shards = stream(&backend).await?;
        let [first, second] = shards.as_slice() else {
            bail!("expected 2 shards, got {shards:?}")
        };
        let faults = FaultInjector::default();
        // Queued ahead and for another operation: must not block the shard's fault.
        faults.push("GetRecords", Fault::ExpiredIterator);
        faults.push_for_shard("GetShardIterator", second, Fault::Throttle);
        let client = faults.client(&backend.kinesis_sdk_config());

        iterator(&client, first).await.context("the other shard passes")?;
        let err = iterator(&client, second)
            .await
            .err()
            .context("the targeted shard fails")?;
        assert!(
            err.as_service_error()
                .is_some_and(|e| e.is_provisioned_throughput_exceeded_exception()),
            "{}",
            DisplayErrorContext(&err)
        );
        iterator(&client, second)
            .await
            .context("one-shot: the next call passes")?;
        assert_eq!(faults.injected(), vec![("GetShardIterator", Fault::Throttle)]);
        faults
            .wait_injected("GetShardIterator", 1, Duration::from_secs(1))
            .await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_sticky_fault_applies_until_cleared_and_queued_ones_go_first() -> anyhow::Result<()> {
        let backend = LocalBackend::start().await?;
        let shards = stream(&backend).await?;
        let shard = shards.first().context("a shard")?;
        let faults = FaultInjector::default();
        let client = faults.client(&backend.kinesis_sdk_config());
        faults.set_sticky("GetShardIterator", None, Fault::ResourceNotFound);
        for _ in 0..2 {
            let err = iterator(&client, shard).await.err().context("sticky fault")?;
            assert!(
                err.as_service_error()
                    .is_some_and(|e| e.is_resource_not_found_exception()),
                "{}",
                DisplayErrorContext(&err)
            );
        }
        faults.push("GetShardIterator", Fault::InvalidArgument);
        let err = iterator(&client, shard).await.err().context("queued fault")?;
        assert!(
            err.as_service_error()
                .is_some_and(|e| e.is_invalid_argument_exception()),
            "{}",
            DisplayErrorContext(&err)
        );
        iterator(&client, shard).await.err().context("sticky again")?;
        faults.clear_sticky("GetShardIterator");
        iterator(&client, shard).await.context("cleared")?;
        faults
            .wait_injected("GetShardIterator", 4, Duration::from_secs(1))
            .await?;
        assert!(faults
            .wait_injected("GetShardIterator", 5, Duration::from_millis(50))
            .await
            .is_err());
        Ok(())
    }

    #[tokio::test]
    async fn an_internal_failure_carries_its_message_and_a_body_is_served() -> anyhow::Result<()> {
        let backend = LocalBackend::start().await?;
        let shards = stream(&backend).await?;
        let shard = shards.first().context("a shard")?;
        let faults = FaultInjector::default();
        let client = faults.client(&backend.kinesis_sdk_config());
        faults.push("ListShards", Fault::InternalFailure("marker 7f3a".into()));
        let err = client
            .list_shards()
            .stream_name("s")
            .send()
            .await
            .err()
            .context("injected failure")?;
        let text = format!("{}", DisplayErrorContext(&err));
        assert!(text.contains("marker 7f3a"), "{text}");

        let iterator = iterator(&client, shard).await?;
        faults.push(
            "GetRecords",
            Fault::Body(
                r#"{"Records":[{"SequenceNumber":"not-a-number","Data":"aGk=","PartitionKey":"k"}],"NextShardIterator":"next","MillisBehindLatest":0}"#
                    .into(),
            ),
        );
        let out = client
            .get_records()
            .shard_iterator(iterator.shard_iterator().context("iterator")?)
            .send()
            .await?;
        let record = out.records().first().context("the crafted record")?;
        assert_eq!(record.sequence_number(), "not-a-number");
        assert_eq!(out.next_shard_iterator(), Some("next"));
        Ok(())
    }

    #[tokio::test]
    async fn a_hung_request_times_out_and_the_next_one_succeeds() -> anyhow::Result<()> {
        let backend = LocalBackend::start().await?;
        stream(&backend).await?;
        let config = backend.kinesis_sdk_config();
        let hanging = HangingHttpClient::new(&config);
        let faults = FaultInjector::default();
        let client = hanging.kinesis_client(&config, Some(&faults));
        hanging.hang_next("ListShards", 1);
        let call = client.list_shards().stream_name("s").send();
        assert!(
            tokio::time::timeout(Duration::from_millis(300), call).await.is_err(),
            "the hung call timed out"
        );
        assert_eq!(hanging.hanging("ListShards"), 1);
        hanging.wait_hung("ListShards", 1, Duration::from_secs(1)).await?;
        let shards = tokio::time::timeout(Duration::from_secs(5), client.list_shards().stream_name("s").send())
            .await
            .context("the next call does not hang")??;
        assert_eq!(shards.shards().len(), 2);
        // The injector still works through this client.
        faults.push("ListShards", Fault::Throttle);
        client
            .list_shards()
            .stream_name("s")
            .send()
            .await
            .err()
            .context("injected")?;
        assert_eq!(hanging.hanging("ListShards"), 1);
        Ok(())
    }
}
