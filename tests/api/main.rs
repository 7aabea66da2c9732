#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Mailroom's integration suite: one binary, real Postgres, Redis, SMTP
//! (aiosmtpd) and a webhook receiver (standardwebhooks), each scenario run
//! on both stacks where it applies.

mod harness;

mod faults;
mod input;
mod limits;
mod openapi;
mod otp;
mod pipeline;
mod templates;
mod webhooks;
