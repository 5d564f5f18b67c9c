//! known_hosts verification with OpenSSH semantics (in progress).
