//! PURE: event topics and the MQTT-style filters routes select them with.
//!
//! Topics are `/`-separated levels: `devices/{imei}/connected`, `commands/{id}/completed`, …
//! A filter is a topic whose levels may be `+` (exactly one level, any text, also empty) or,
//! as the last level only, `#` (that level's parent and everything below it: `devices/#`
//! matches `devices`, `devices/1` and `devices/1/connected`), as in MQTT 3.1.1 section 4.7.
//! The deliverer selects a route's events in SQL with [`TopicFilter::sql_regex`], so that a
//! route for rare events does not read every telemetry event, and checks each row again with
//! [`TopicFilter::matches`]; the tests hold the two to the same answers.

use std::fmt;

use crate::protocol::Imei;

/// The longest filter accepted, in bytes (MQTT allows 65535; ours are config lines).
const MAX_FILTER_LEN: usize = 1024;

/// A validated topic filter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicFilter {
    text: String,
}

/// Why a filter was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FilterError {
    #[error("empty topic filter")]
    Empty,
    #[error("topic filter longer than {MAX_FILTER_LEN} bytes")]
    TooLong,
    #[error("topic filter {0:?}: `#` may only be a whole level, and only the last one")]
    MisplacedHash(String),
    #[error("topic filter {0:?}: `+` may only be a whole level")]
    MisplacedPlus(String),
    #[error("topic filter {0:?}: control characters are not allowed")]
    Control(String),
}

impl TopicFilter {
    /// Parses a filter.
    ///
    /// # Errors
    /// Empty or too long; `#` not alone in the last level; `+` not alone in its level; a
    /// control character (NUL included).
    pub fn parse(text: &str) -> Result<TopicFilter, FilterError> {
        if text.is_empty() {
            return Err(FilterError::Empty);
        }
        if text.len() > MAX_FILTER_LEN {
            return Err(FilterError::TooLong);
        }
        if text.chars().any(char::is_control) {
            return Err(FilterError::Control(text.into()));
        }
        let levels: Vec<&str> = text.split('/').collect();
        for (i, level) in levels.iter().enumerate() {
            if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
                return Err(FilterError::MisplacedHash(text.into()));
            }
            if level.contains('+') && *level != "+" {
                return Err(FilterError::MisplacedPlus(text.into()));
            }
        }
        Ok(TopicFilter { text: text.into() })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `topic` is selected by this filter.
    pub fn matches(&self, topic: &str) -> bool {
        let mut want = self.text.split('/');
        let mut have = topic.split('/');
        loop {
            match (want.next(), have.next()) {
                // `#` also matches its parent level: `a/#` matches `a`.
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(w), Some(h)) if w == h => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// A PostgreSQL regular expression (ARE) matching exactly the topics [`Self::matches`]
    /// matches: every ASCII character that is not a letter or digit is escaped (in an ARE a
    /// backslash before a non-alphanumeric character makes it literal).
    pub fn sql_regex(&self) -> String {
        let levels: Vec<&str> = self.text.split('/').collect();
        let mut re = String::from("^");
        for (i, level) in levels.iter().enumerate() {
            match *level {
                "#" if i == 0 => {
                    re.push_str(".*");
                    break;
                }
                "#" => {
                    // `a/#`: `a`, or `a/` and anything.
                    re.push_str("(/.*)?");
                    break;
                }
                _ => {
                    if i > 0 {
                        re.push_str("\\/");
                    }
                    if *level == "+" {
                        re.push_str("[^/]*");
                    } else {
                        for c in level.chars() {
                            // Non-ASCII characters are no metacharacters (and some
                            // locales count them alphanumeric: `\ä` would be an escape).
                            if c.is_ascii() && !c.is_ascii_alphanumeric() {
                                re.push('\\');
                            }
                            re.push(c);
                        }
                    }
                }
            }
        }
        re.push('$');
        re
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A device event: the last level of `devices/{imei}/…`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceEvent {
    Connected,
    Disconnected,
    LoginRefused,
    Telemetry,
}

impl DeviceEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceEvent::Connected => "connected",
            DeviceEvent::Disconnected => "disconnected",
            DeviceEvent::LoginRefused => "login_refused",
            DeviceEvent::Telemetry => "telemetry",
        }
    }
}

/// A command event: the last level of `commands/{id}/…`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandEvent {
    Completed,
    Failed,
    Expired,
}

impl CommandEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandEvent::Completed => "completed",
            CommandEvent::Failed => "failed",
            CommandEvent::Expired => "expired",
        }
    }
}

/// `devices/{imei}/{event}`, the IMEI as its 15 digits (leading zeros kept).
pub fn device_topic(imei: u64, event: DeviceEvent) -> String {
    format!("devices/{imei:015}/{}", event.as_str())
}

/// `devices/{imei}/{event}` of a typed IMEI.
pub fn device_topic_of(imei: Imei, event: DeviceEvent) -> String {
    device_topic(imei.as_u64(), event)
}

/// `commands/{id}/{event}`.
pub fn command_topic(command_id: i64, event: CommandEvent) -> String {
    format!("commands/{command_id}/{}", event.as_str())
}

/// (filter, topic, matches): the MQTT 3.1.1 section 4.7 examples and ours. Public for the
/// test that holds [`TopicFilter::sql_regex`] to the same answers in PostgreSQL.
#[doc(hidden)]
pub const FILTER_CASES: &[(&str, &str, bool)] = &[
    (
        "devices/356307042441013/connected",
        "devices/356307042441013/connected",
        true,
    ),
    (
        "devices/356307042441013/connected",
        "devices/356307042441013/disconnected",
        false,
    ),
    (
        "devices/356307042441013/connected",
        "devices/356307042441014/connected",
        false,
    ),
    (
        "devices/+/connected",
        "devices/356307042441013/connected",
        true,
    ),
    (
        "devices/+/connected",
        "devices/356307042441013/connected/x",
        false,
    ),
    ("devices/+/connected", "devices/connected", false),
    ("devices/+/connected", "devices//connected", true),
    ("devices/+/+", "devices/356307042441013/telemetry", true),
    ("devices/+/+", "devices/356307042441013", false),
    ("devices/#", "devices/356307042441013/telemetry", true),
    ("devices/#", "devices", true),
    ("devices/#", "devices/", true),
    ("devices/#", "devicesx/1", false),
    ("devices/#", "commands/1/completed", false),
    ("#", "devices/356307042441013/telemetry", true),
    ("#", "commands/7/failed", true),
    ("#", "x", true),
    ("+", "devices", true),
    ("+", "devices/1", false),
    ("+/+/completed", "commands/7/completed", true),
    ("+/+/completed", "devices/7/connected", false),
    ("commands/+/#", "commands/7/completed", true),
    ("commands/+/#", "commands/7", true),
    ("commands/+/#", "commands", false),
    ("commands/7/completed", "commands/70/completed", false),
    ("commands/7/completed", "commands/7/completed/", false),
    ("sport/tennis/player1/#", "sport/tennis/player1", true),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/ranking",
        true,
    ),
    (
        "sport/tennis/player1/#",
        "sport/tennis/player1/score/wimbledon",
        true,
    ),
    ("sport/+", "sport", false),
    ("sport/+", "sport/", true),
    ("+/tennis/#", "sport/tennis/player1", true),
    ("/finance", "/finance", true),
    ("+/+", "/finance", true),
    ("/+", "/finance", true),
    ("+", "/finance", false),
    // Regex metacharacters in a filter are literal.
    ("a.c/x", "abc/x", false),
    ("a.c/x", "a.c/x", true),
    ("a*/x", "aaa/x", false),
    ("(a|b)/x", "a/x", false),
    ("(a|b)/x", "(a|b)/x", true),
    ("[^/]*", "devices", false),
    ("ä\\d/x", "ä\\d/x", true),
    ("ä\\d/x", "ä5/x", false),
    ("$SYS/x", "$SYS/x", true),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_mqtt_says() {
        for &(filter, topic, want) in FILTER_CASES {
            let f = TopicFilter::parse(filter).unwrap();
            assert_eq!(f.matches(topic), want, "{filter} vs {topic}");
        }
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in [
            "",
            "devices/#/x",
            "devices#",
            "devices/#x",
            "##",
            "dev+",
            "devices/+x/y",
            "a/b+",
            "a\0b",
            "a\nb",
        ] {
            assert!(TopicFilter::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            TopicFilter::parse(&"a".repeat(MAX_FILTER_LEN + 1)),
            Err(FilterError::TooLong)
        );
        for good in ["#", "+", "+/+", "a//b", "/", "devices/+/#"] {
            assert!(TopicFilter::parse(good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn regexes_have_the_expected_shape() {
        let re = |f: &str| TopicFilter::parse(f).unwrap().sql_regex();
        assert_eq!(re("#"), "^.*$");
        assert_eq!(re("devices/+/connected"), "^devices\\/[^/]*\\/connected$");
        assert_eq!(re("devices/#"), "^devices(/.*)?$");
        assert_eq!(re("a.b"), "^a\\.b$");
    }

    #[test]
    fn topics_name_the_imei_in_15_digits() {
        assert_eq!(
            device_topic(356_307_042_441_013, DeviceEvent::Connected),
            "devices/356307042441013/connected"
        );
        assert_eq!(
            device_topic(42, DeviceEvent::LoginRefused),
            "devices/000000000000042/login_refused"
        );
        assert_eq!(
            command_topic(17, CommandEvent::Expired),
            "commands/17/expired"
        );
    }
}
