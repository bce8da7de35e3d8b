//! HAProxy agent-check server (keep-your-HAProxy mode). Not written yet.
