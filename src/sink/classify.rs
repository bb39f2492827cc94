//! PURE: what the writer does about a database error. One table, so every statement the writer
//! runs (the telemetry transaction, the session-event insert, the connect) reacts to the same
//! SQLSTATE the same way, and so the table is unit-tested without a server.

use tokio_postgres::error::SqlState;

/// The writer's reaction to a failed database call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Nothing is wrong with the data: the connection was lost, the server is shutting down or
    /// out of resources, or the transaction lost a race (serialization failure, deadlock). The
    /// same write is tried again, reconnecting with back-off, until it works or the shutdown
    /// deadline passes. Nothing is answered meanwhile: that is the back-pressure.
    Retry,
    /// A unique violation: the batch holds records already stored (a device resent a frame whose
    /// ack was lost). The batch is written again through the staging table with
    /// `ON CONFLICT DO NOTHING`, which absorbs the duplicates.
    Duplicate,
    /// The data itself is refused (malformed COPY data, a value the column type refuses, a
    /// constraint). Retrying the same rows can never work: the writer splits the batch until
    /// only the offending frame (or session event) is left, and that one alone fails.
    Refused,
    /// Nothing will ever work: the schema is not ours (missing table or column), a privilege is
    /// missing, authentication fails, the database is gone or read-only. Retrying would only
    /// hide it, and splitting would fail every frame one by one: the writer answers what it
    /// holds `Failed` and its thread ends, which stops `serve` with that error.
    Fatal,
}

/// Classifies a failed call by its SQLSTATE and whether the connection is closed.
///
/// A closed connection, or an error without SQLSTATE (socket, I/O or framing trouble on our
/// side of the connection), is [`ErrorClass::Retry`]: nothing the server said blames the data.
/// (Errors of a bad connection string or missing password carry no SQLSTATE either, but
/// `serve` connects with the same settings before it starts, so they cannot appear later.)
/// A SQLSTATE that the table below does not know is [`ErrorClass::Refused`]: narrowing it down
/// costs a few transactions, fails at worst every frame of the batch (devices resend them),
/// and never loops.
pub fn classify(code: Option<&SqlState>, is_closed: bool) -> ErrorClass {
    if is_closed {
        return ErrorClass::Retry;
    }
    let Some(code) = code else {
        return ErrorClass::Retry;
    };
    let c = code.code();
    let class = c.get(..2).unwrap_or("");
    match (class, c) {
        (_, "23505") => ErrorClass::Duplicate, // unique_violation
        // protocol_violation: also what PostgreSQL raises for a COPY field shorter than its
        // type ("insufficient data left in message"): bad data, not a bad connection.
        (_, "08P01") => ErrorClass::Refused,
        ("08", _) => ErrorClass::Retry, // connection exception
        // transaction rollback: serialization failure, deadlock, completion unknown; but
        // transaction_integrity_constraint_violation is about the data.
        (_, "40002") => ErrorClass::Refused,
        ("40", _) => ErrorClass::Retry,
        (_, "55P03" | "55006") => ErrorClass::Retry, // lock not available, object in use
        ("53", _) => ErrorClass::Retry, // disk full, out of memory, too many connections
        (_, "57P04") => ErrorClass::Fatal, // database dropped
        ("57", _) => ErrorClass::Retry, // admin/crash shutdown, cannot connect now, query canceled
        ("58", _) => ErrorClass::Retry, // I/O error on the server
        (_, "72000") => ErrorClass::Retry, // snapshot too old
        ("28", _) => ErrorClass::Fatal, // invalid authorization / password
        (_, "3D000" | "3F000") => ErrorClass::Fatal, // no such database / schema
        (_, "25006") => ErrorClass::Fatal, // read-only transaction: a standby
        // datatype_mismatch: a binary COPY array whose element type is not the column's.
        (_, "42804") => ErrorClass::Refused,
        // Syntax error or access rule violation: undefined table/column/function, insufficient
        // privilege. The schema or the role is not what this gateway was built for.
        ("42", _) => ErrorClass::Fatal,
        // Data exception, integrity constraint violation, program limit exceeded.
        ("22" | "23" | "54", _) => ErrorClass::Refused,
        _ => ErrorClass::Refused,
    }
}

/// [`classify`] for a `tokio_postgres` error.
pub fn classify_error(e: &tokio_postgres::Error) -> ErrorClass {
    classify(e.code(), e.is_closed())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(code: &str) -> ErrorClass {
        classify(Some(&SqlState::from_code(code)), false)
    }

    #[test]
    fn lost_connections_and_transient_server_states_are_retried() {
        assert_eq!(classify(None, false), ErrorClass::Retry);
        assert_eq!(classify(None, true), ErrorClass::Retry);
        // Whatever the code, a closed connection says nothing about the data.
        assert_eq!(
            classify(Some(&SqlState::UNDEFINED_TABLE), true),
            ErrorClass::Retry
        );
        for code in [
            "08006", // connection_failure
            "08003", // connection_does_not_exist
            "08001", // sqlclient_unable_to_establish_sqlconnection
            "57P01", // admin_shutdown
            "57P02", // crash_shutdown
            "57P03", // cannot_connect_now
            "57014", // query_canceled
            "53100", // disk_full
            "53200", // out_of_memory
            "53300", // too_many_connections
            "40001", // serialization_failure
            "40P01", // deadlock_detected
            "55P03", // lock_not_available
            "58030", // io_error
        ] {
            assert_eq!(of(code), ErrorClass::Retry, "{code}");
        }
    }

    #[test]
    fn a_unique_violation_is_absorbed_as_a_duplicate() {
        assert_eq!(of("23505"), ErrorClass::Duplicate);
    }

    #[test]
    fn refused_data_is_split_down_to_the_offending_frame() {
        for code in [
            "08P01", // protocol_violation: a COPY field shorter than its type
            "22P04", // bad_copy_file_format
            "22P03", // invalid_binary_representation
            "22021", // character_not_in_repertoire: a NUL byte in text
            "22008", // datetime_field_overflow
            "23502", // not_null_violation
            "23514", // check_violation
            "42804", // datatype_mismatch: wrong array element type in binary COPY
            "54000", // program_limit_exceeded
            "XX000", // internal_error: unknown cause, narrowed down like data
            "P0001", // raise_exception from an operator's trigger
        ] {
            assert_eq!(of(code), ErrorClass::Refused, "{code}");
        }
    }

    #[test]
    fn errors_that_no_retry_can_fix_are_fatal() {
        for code in [
            "42P01", // undefined_table
            "42703", // undefined_column
            "42883", // undefined_function
            "42501", // insufficient_privilege
            "28P01", // invalid_password
            "28000", // invalid_authorization_specification
            "3D000", // invalid_catalog_name: the database does not exist
            "57P04", // database_dropped
            "25006", // read_only_sql_transaction
        ] {
            assert_eq!(of(code), ErrorClass::Fatal, "{code}");
        }
    }
}
