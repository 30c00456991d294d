//! Topic names and topic filters: validation (MQTT 5 4.7 / 3.1.1 4.7), shared
//! subscription parsing (`$share/GROUP/FILTER`, MQTT 5 4.8.2), single-filter
//! matching, and the [`SubscriptionTree`] used to find every subscription
//! matching a topic.
//!
//! This module owns the *string rules* of topics and nothing else: it knows no
//! sessions, QoS or clients. Keys and values in the tree are opaque to it.
//! It must not depend on any other raftmq module.

mod submap;
mod tree;

pub use tree::SubscriptionTree;

/// Longest topic name or filter MQTT can carry (a UTF-8 string with a 16-bit length).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// The prefix of a shared subscription filter.
pub const SHARED_PREFIX: &str = "$share/";

/// Checks the rules common to names and filters: non-empty, at most
/// [`MAX_TOPIC_LEN`] bytes, no U+0000 (MQTT 1.5.4 forbids it in UTF-8 strings).
fn valid_common(s: &str) -> bool {
    !s.is_empty() && s.len() <= MAX_TOPIC_LEN && !s.contains('\0')
}

/// A topic name as used in PUBLISH: no wildcard characters at all.
pub fn valid_topic_name(t: &str) -> bool {
    valid_common(t) && !t.contains(['+', '#'])
}

/// A plain (non-shared) filter: `+` and `#` each occupy a whole level, and `#`
/// only as the last level.
fn valid_plain_filter(f: &str) -> bool {
    if !valid_common(f) {
        return false;
    }
    let mut levels = f.split('/').peekable();
    while let Some(level) = levels.next() {
        match level {
            "+" => {}
            "#" => {
                if levels.peek().is_some() {
                    return false;
                }
            }
            _ => {
                if level.contains(['+', '#']) {
                    return false;
                }
            }
        }
    }
    true
}

/// A topic filter as used in SUBSCRIBE/UNSUBSCRIBE. A filter starting with
/// `$share/` must be a well-formed shared subscription (see [`parse_shared`]).
pub fn valid_topic_filter(f: &str) -> bool {
    if f.starts_with(SHARED_PREFIX) {
        return parse_shared(f).is_some();
    }
    valid_plain_filter(f)
}

/// Splits `$share/GROUP/FILTER` into `(GROUP, FILTER)`. Returns None when `f`
/// is not a shared filter or is malformed: the group must be non-empty and
/// contain none of `+ # /`; the filter must be a valid plain filter.
pub fn parse_shared(f: &str) -> Option<(&str, &str)> {
    if f.len() > MAX_TOPIC_LEN {
        return None;
    }
    let rest = f.strip_prefix(SHARED_PREFIX)?;
    let (group, filter) = rest.split_once('/')?;
    if group.is_empty() || group.contains(['+', '#', '\0']) {
        return None;
    }
    if !valid_plain_filter(filter) {
        return None;
    }
    Some((group, filter))
}

/// Whether the plain filter `filter` matches the topic name `topic`.
///
/// A filter whose first level is a wildcard does not match a topic whose first
/// level starts with `$` (MQTT 4.7.2). A shared filter is matched literally: strip
/// it with [`parse_shared`] first. Inputs are not validated here.
pub fn matches(filter: &str, topic: &str) -> bool {
    let mut f_levels = filter.split('/');
    let mut t_levels = topic.split('/');
    let mut first = true;
    loop {
        match (f_levels.next(), t_levels.next()) {
            (Some("#"), t) => {
                // `#` also matches the parent level ("a/#" matches "a").
                return !(first && t.is_some_and(|t| t.starts_with('$')));
            }
            (Some("+"), Some(t)) => {
                if first && t.starts_with('$') {
                    return false;
                }
            }
            (Some(f), Some(t)) => {
                if f != t {
                    return false;
                }
            }
            (None, None) => return true,
            _ => return false,
        }
        first = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names() {
        assert!(valid_topic_name("a"));
        assert!(valid_topic_name("/"));
        assert!(valid_topic_name("a//b"));
        assert!(valid_topic_name("$SYS/broker"));
        assert!(valid_topic_name("sport/tennis player1"));
        assert!(!valid_topic_name(""));
        assert!(!valid_topic_name("a/+"));
        assert!(!valid_topic_name("a/#"));
        assert!(!valid_topic_name("a+b"));
        assert!(!valid_topic_name("a\0b"));
        assert!(valid_topic_name(&"x".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic_name(&"x".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn topic_filters() {
        for ok in ["#", "+", "+/+", "a/#", "a/+/b", "/+", "+/", "a//#", "$SYS/#", "a", "/"] {
            assert!(valid_topic_filter(ok), "{ok}");
        }
        for bad in ["", "a/#/b", "a#", "a/b#", "a+/b", "+a", "##", "a/++", "a\0", "#/"] {
            assert!(!valid_topic_filter(bad), "{bad:?}");
        }
        assert!(!valid_topic_filter(&"a".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn shared_filters() {
        assert_eq!(parse_shared("$share/g/a/b"), Some(("g", "a/b")));
        assert_eq!(parse_shared("$share/g/#"), Some(("g", "#")));
        assert_eq!(parse_shared("$share/g//"), Some(("g", "/")));
        assert_eq!(parse_shared("$share/g/"), None);
        assert_eq!(parse_shared("$share//a"), None);
        assert_eq!(parse_shared("$share/g"), None);
        assert_eq!(parse_shared("$share/g+/a"), None);
        assert_eq!(parse_shared("$share/g#/a"), None);
        assert_eq!(parse_shared("$share/g/a/#/b"), None);
        assert_eq!(parse_shared("a/b"), None);
        assert_eq!(parse_shared("$shared/g/a"), None);
        assert!(valid_topic_filter("$share/g/+/x"));
        assert!(!valid_topic_filter("$share/g"));
        assert!(!valid_topic_filter("$share//x"));
        // "$share" alone is an ordinary (if odd) filter.
        assert!(valid_topic_filter("$share"));
    }

    #[test]
    fn matching() {
        let yes = [
            ("#", "a"),
            ("#", "a/b"),
            ("#", "/"),
            ("a/#", "a"),
            ("a/#", "a/b/c"),
            ("a/+", "a/b"),
            ("a/+", "a/"),
            ("+/+", "/"),
            ("+", "a"),
            ("/+", "/a"),
            ("a/b", "a/b"),
            ("$SYS/#", "$SYS/x"),
            ("$SYS/+", "$SYS/x"),
            ("$SYS/#", "$SYS"),
            ("a/+/#", "a/b"),
        ];
        for (f, t) in yes {
            assert!(matches(f, t), "{f} should match {t}");
        }
        let no = [
            ("a/+", "a"),
            ("a/+", "a/b/c"),
            ("+", "/a"),
            ("+", "a/b"),
            ("a", "a/b"),
            ("a/b", "a"),
            ("#", "$SYS/x"),
            ("#", "$SYS"),
            ("+/x", "$SYS/x"),
            ("+", "$"),
            ("a/b", "a/c"),
        ];
        for (f, t) in no {
            assert!(!matches(f, t), "{f} should not match {t}");
        }
    }
}
