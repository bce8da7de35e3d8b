//! Shared test harness for pushfleet's integration tests and load tools.
