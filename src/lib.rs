//! Mailroom: a self-hosted transactional email HTTP API.
//!
//! The data path: `http` (auth, limits, validation) → `sending` (render,
//! compose, one transaction) → `queue` (ids) → `delivery` (claim, relay,
//! record) → `webhooks` (signed events). Ports: `store`, `queue`, `limiter`,
//! `relay`; adapters are chosen once, in `app`.

pub mod app;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod domain;
pub mod error;
pub mod http;
pub mod keys;
pub mod limiter;
pub mod metrics;
pub mod nul;
pub mod queue;
pub mod redis_conn;
pub mod relay;
pub mod sending;
pub mod store;
pub mod telemetry;
pub mod templates;
pub mod ttl_cache;
pub mod webhooks;
