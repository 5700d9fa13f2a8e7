//! Leases: the model, the [`LeaseStore`] trait, and the lease management of a worker
//! (the Java KCL's `leases` package), one role per file.
//!
//! A lease is one item of the lease table per shard. Its `lease_counter` is the fencing
//! token: every write that changes ownership or progress is conditional on the counter
//! (and owner) the writer last saw, and increments it. Workers judge expiry by watching
//! the counter change on their own monotonic clock, never by comparing wall clocks.
//!
//! `kcl-core` defines the trait; `kcl-dynamo` implements it on DynamoDB.
//! [`InMemoryLeaseStore`] keeps a table in memory with the same conditional semantics,
//! for unit tests of code built on the library and for measuring the framework alone.
//!
//! # The life of a lease
//!
//! ```text
//!                 shard sync creates it (unowned, at its initial position)
//!                                   |
//!                                   v
//!      +----------------------> UNOWNED <----------------------------+
//!      |                            |                                |
//!      |          take (any worker; counter +1, owner = taker)       |
//!      |                            v                                |
//!      |   +-- renew (owner; +1) -- OWNED -- checkpoint (owner; +1)  |
//!      |   |                      ^ |  | \                           |
//!      |   +----------------------+ |  |  \ counter still for the    |
//!      |                            |  |   \ failover time: EXPIRED  |
//!      |   initiate handoff         |  |    \-> take (any; +1) ------+--> OWNED by the taker
//!      |   (receiver, leader, or    |  |
//!      |    owner at shutdown;      |  |
//!      |    counter unchanged,      |  +-- checkpoint SHARD_END (owner; +1) --> ENDED
//!      |    leaseOwner = receiver,  |                                          |
//!      |    checkpointOwner = old)  v                                          |
//!      |                      HANDING OVER                                     |
//!      |        (old owner renews and checkpoints on)                          |
//!      |            |                          |                               |
//!      |  release (old owner; +1,              | timeout / old owner silent:   |
//!      |  checkpointOwner cleared)             | assign to self (receiver; +1) |
//!      |            v                          v                               |
//!      |     OWNED by the receiver      OWNED by the receiver                  |
//!      |                                                                       |
//!      +-- release (owner at shutdown; owner cleared, +1, or assigned          |
//!          to a live worker)                                                   |
//!                                                                              v
//!                           children started + cleanup delay: DELETED (cleanup)
//! ```
//!
//! | transition | who writes | under which condition | where |
//! |---|---|---|---|
//! | create | any worker's shard sync | the item does not exist | `shard_sync` |
//! | take | any worker | counter and owners as read; unowned, expired, or given to it | `taker`, `coordinator` |
//! | renew | the owner, or the checkpoint owner during a handoff | counter and owners as last written | `renewer` |
//! | checkpoint | the owner (or checkpoint owner), never past its proof of ownership | counter and owners | `renewer` |
//! | expire | nobody writes: each worker's own observation | counter unchanged for `failover_time` | `expiry` |
//! | initiate handoff | the receiver, or the leader for it; the owner at shutdown, of its own leases | counter and owners; no handoff under way | `coordinator`, `taker`, `handoff` (`announce_handoffs`) |
//! | complete handoff | the old owner, once its consumer stopped | counter and owners | `coordinator` (`release`) |
//! | end a stuck handoff | the receiver | owners as read (counter moves) | `handoff` |
//! | assign | the leader (unowned/expired leases beyond its share), a stopping worker (its own, or one handed over or assigned to it but not taken yet, also once a handoff to it completed while it stopped: never a handoff under way, which a Java old owner completes only to the receiver it read) | owners as read | `taker`, `coordinator`, `handoff` (`pass_on`) |
//! | release | the owner at shutdown or when a consumer stops; a stopping worker, of a lease handed to it but not taken yet, when no live worker is left | counter and owners | `coordinator`, `handoff` (`pass_on`) |
//! | delete | the cleanup, of any worker | children started, delay passed, counter unchanged | `cleanup` |
//! | leader lock | `leader` | version as read | `leader` |
//!
//! ## Files
//! - `model`: [`Lease`], [`LeaderLock`], [`LeaseListing`], [`HashKeyRange`].
//! - `store`: the [`LeaseStore`] trait; `timed` (every call bounded) and `in_memory`
//!   ([`InMemoryLeaseStore`]) wrap or implement it.
//! - `held`: the state of one held lease, shared with its consumer.
//! - `renewer`: the held set, renewals, the watchdog, fenced checkpoint writes.
//! - `coordinator`: acquiring, asking for handoffs, releasing.
//! - `expiry`: the counter rule, and "half a renewal interval before the read".
//! - `taker`: the plan of a lease-taking pass, and carrying it out.
//! - `assignment`: handing out and balancing, by count or by throughput.
//! - `handoff`: graceful handoff, the receiver's side and the shutdown pass-on.
//! - `cleanup`: deleting finished and former streams' leases.
//! - `leader`: the leader lock.

pub(crate) mod assignment;
pub(crate) mod cleanup;
pub(crate) mod coordinator;
pub(crate) mod expiry;
pub(crate) mod handoff;
pub(crate) mod held;
pub(crate) mod in_memory;
pub(crate) mod leader;
pub(crate) mod model;
pub(crate) mod renewer;
pub(crate) mod store;
pub(crate) mod taker;
pub(crate) mod timed;

#[cfg(test)]
mod tests;

pub use in_memory::InMemoryLeaseStore;
pub use model::{HashKeyRange, LeaderLock, Lease, LeaseListing};
pub use store::LeaseStore;
