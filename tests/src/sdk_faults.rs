//! Faults at a rate, for the chaos runner's workers: [`RandomFaults`], an SDK
//! interceptor for Kinesis and DynamoDB alike that replaces a seeded random share of
//! responses with what the emulators never send: throttling errors, internal server
//! errors (HTTP 500) and, for `GetRecords`, expired iterators.
//!
//! The request has reached the backend when its response is replaced, so a write
//! happened even though the client sees it fail: the case of a conditional DynamoDB
//! write that landed and timed out on the way back, which fencing must survive. Network
//! faults (resets, slowness, blackouts) are the [`proxy`](crate::proxy)'s.

use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

/// A kind of injected fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SdkFault {
    /// HTTP 400 throttling: `ProvisionedThroughputExceededException` (Kinesis reads,
    /// DynamoDB), `LimitExceededException` (other Kinesis control calls).
    Throttle,
    /// HTTP 500: `InternalFailure` (Kinesis), `InternalServerError` (DynamoDB).
    ServerError,
    /// HTTP 400 `ExpiredIteratorException`, `GetRecords` only.
    ExpiredIterator,
}

impl SdkFault {
    /// Its name in recordings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Throttle => "throttle",
            Self::ServerError => "server-error",
            Self::ExpiredIterator => "expired-iterator",
        }
    }
}

/// Which service a client talks to: the error shapes differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    /// Kinesis (`application/x-amz-json-1.1`).
    Kinesis,
    /// DynamoDB (`application/x-amz-json-1.0`).
    DynamoDb,
}

impl Service {
    /// Its name in recordings.
    pub fn name(self) -> &'static str {
        match self {
            Self::Kinesis => "kinesis",
            Self::DynamoDb => "dynamodb",
        }
    }

    /// The status, content type and body of `fault`'s response to `operation`.
    fn response(self, operation: &str, fault: SdkFault) -> (u16, &'static str, String) {
        const MESSAGE: &str = "injected by the chaos runner";
        let error = |status: u16, error_type: &str| {
            let (content_type, error_type) = match self {
                Self::Kinesis => ("application/x-amz-json-1.1", error_type.to_owned()),
                Self::DynamoDb => (
                    "application/x-amz-json-1.0",
                    format!("com.amazonaws.dynamodb.v20120810#{error_type}"),
                ),
            };
            (
                status,
                content_type,
                format!(r#"{{"__type":"{error_type}","message":"{MESSAGE}"}}"#),
            )
        };
        match (self, fault) {
            (Self::Kinesis, SdkFault::Throttle) if matches!(operation, "GetRecords" | "GetShardIterator") => {
                error(400, "ProvisionedThroughputExceededException")
            }
            (Self::Kinesis, SdkFault::Throttle) => error(400, "LimitExceededException"),
            (Self::Kinesis, SdkFault::ServerError) => error(500, "InternalFailure"),
            (Self::Kinesis, SdkFault::ExpiredIterator) => error(400, "ExpiredIteratorException"),
            (Self::DynamoDb, SdkFault::Throttle | SdkFault::ExpiredIterator) => {
                error(400, "ProvisionedThroughputExceededException")
            }
            (Self::DynamoDb, SdkFault::ServerError) => error(500, "InternalServerError"),
        }
    }
}

/// Called with (service, operation, fault) for each fault injected.
pub type FaultObserver = Arc<dyn Fn(Service, &str, SdkFault) + Send + Sync>;

/// An SDK interceptor that replaces each response with a fault with probability `rate`,
/// from a seeded generator: the same seed gives the same sequence of decisions (the
/// calls themselves are timed by the network, so which call gets which fault varies).
#[derive(Clone)]
pub struct RandomFaults {
    service: Service,
    rate: f64,
    rng: Arc<Mutex<StdRng>>,
    observer: FaultObserver,
}

impl std::fmt::Debug for RandomFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RandomFaults")
            .field("service", &self.service)
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

impl RandomFaults {
    /// Faults at `rate` (0 to 1) into `service`'s responses, seeded with `seed`;
    /// `observer` hears of each one.
    pub fn new(service: Service, rate: f64, seed: u64, observer: FaultObserver) -> Self {
        Self {
            service,
            rate: rate.clamp(0.0, 1.0),
            rng: Arc::new(Mutex::new(StdRng::seed_from_u64(seed))),
            observer,
        }
    }

    /// The fault for the next response of `operation`, if any.
    pub fn decide(&self, operation: &str) -> Option<SdkFault> {
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        if !rng.random_bool(self.rate) {
            return None;
        }
        let kinds: &[SdkFault] = if self.service == Service::Kinesis && operation == "GetRecords" {
            &[SdkFault::Throttle, SdkFault::ServerError, SdkFault::ExpiredIterator]
        } else {
            &[SdkFault::Throttle, SdkFault::ServerError]
        };
        Some(kinds[rng.random_range(0..kinds.len())])
    }

    /// A Kinesis client on `config` with this interceptor (the SDK's own retries stay on,
    /// as an application would have them).
    pub fn kinesis_client(&self, config: &aws_types::SdkConfig) -> aws_sdk_kinesis::Client {
        let conf = aws_sdk_kinesis::config::Builder::from(config)
            .interceptor(self.clone())
            .build();
        aws_sdk_kinesis::Client::from_conf(conf)
    }

    /// A DynamoDB client on `config` with this interceptor.
    pub fn dynamodb_client(&self, config: &aws_types::SdkConfig) -> aws_sdk_dynamodb::Client {
        let conf = aws_sdk_dynamodb::config::Builder::from(config)
            .interceptor(self.clone())
            .build();
        aws_sdk_dynamodb::Client::from_conf(conf)
    }
}

impl Intercept for RandomFaults {
    fn name(&self) -> &'static str {
        "RandomFaults"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let Some(operation) = cfg.load::<Metadata>().map(|m| m.name().to_owned()) else {
            return Ok(());
        };
        let Some(fault) = self.decide(&operation) else {
            return Ok(());
        };
        let (status, content_type, body) = self.service.response(&operation, fault);
        let mut response = aws_smithy_runtime_api::http::Response::new(
            aws_smithy_runtime_api::http::StatusCode::try_from(status)?,
            aws_smithy_types::body::SdkBody::from(body),
        );
        response.headers_mut().insert("content-type", content_type);
        *context.response_mut() = response;
        (self.observer)(self.service, &operation, fault);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decisions(seed: u64, rate: f64) -> Vec<Option<SdkFault>> {
        let faults = RandomFaults::new(Service::Kinesis, rate, seed, Arc::new(|_, _, _| {}));
        (0..2000).map(|_| faults.decide("GetRecords")).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_faults_at_about_the_rate() {
        let a = decisions(7, 0.05);
        assert_eq!(a, decisions(7, 0.05));
        assert_ne!(a, decisions(8, 0.05));
        let n = a.iter().flatten().count();
        assert!((50..=150).contains(&n), "{n} faults in 2000 calls at 5%");
        for kind in [SdkFault::Throttle, SdkFault::ServerError, SdkFault::ExpiredIterator] {
            assert!(a.contains(&Some(kind)), "{kind:?} never chosen");
        }
        assert!(decisions(7, 0.0).iter().all(Option::is_none));
    }

    #[test]
    fn expired_iterators_only_for_get_records() {
        let faults = RandomFaults::new(Service::Kinesis, 1.0, 1, Arc::new(|_, _, _| {}));
        assert!((0..500).all(|_| faults.decide("ListShards") != Some(SdkFault::ExpiredIterator)));
        let (status, content_type, body) = Service::DynamoDb.response("PutItem", SdkFault::ServerError);
        assert_eq!((status, content_type), (500, "application/x-amz-json-1.0"));
        assert!(body.contains("#InternalServerError"), "{body}");
    }
}
