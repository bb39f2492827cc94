//! Configuration: serde structs, defaults, validation.
