//! Delivery-status webhooks: Standard Webhooks signing, an SSRF-safe HTTP
//! client (addresses checked inside the resolver the client connects with),
//! and the dispatcher that delivers pending events with retries.

mod dispatcher;
pub mod signing;
mod slots;
pub mod ssrf;

pub use dispatcher::Dispatcher;
pub use slots::Ticket;
