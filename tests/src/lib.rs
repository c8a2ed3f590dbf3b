//! Helpers for the integration tests: start workloads, run stalltrace, read its JSON.
