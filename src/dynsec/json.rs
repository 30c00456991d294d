//! A small JSON value that keeps object keys in document order, with the
//! lookup rules of cJSON (first key that matches case-insensitively) and a
//! writer that emits keys in the order they were built (compact for control
//! responses, tab-indented for `dynamic-security.json`).
//!
//! Why not `serde_json::Value`: its map sorts keys (without the crate-wide
//! `preserve_order` feature, which would change every other JSON the broker
//! writes), and Mosquitto's response shapes have a fixed key order.

use std::fmt::Write as _;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum J {
    Null,
    Bool(bool),
    Num(f64),
    Int(i64),
    Str(String),
    Arr(Vec<J>),
    Obj(Vec<(String, J)>),
}

impl J {
    pub(crate) fn parse(bytes: &[u8]) -> Option<J> {
        serde_json::from_slice(bytes).ok()
    }

    /// cJSON_GetObjectItem: the first key equal ignoring ASCII case.
    pub(crate) fn get(&self, key: &str) -> Option<&J> {
        match self {
            J::Obj(items) => items.iter().find(|(k, _)| k.eq_ignore_ascii_case(key)).map(|(_, v)| v),
            _ => None,
        }
    }

    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            J::Str(s) => Some(s),
            _ => None,
        }
    }

    pub(crate) fn as_array(&self) -> Option<&[J]> {
        match self {
            J::Arr(a) => Some(a),
            _ => None,
        }
    }

    pub(crate) fn as_bool(&self) -> Option<bool> {
        match self {
            J::Bool(b) => Some(*b),
            _ => None,
        }
    }

    pub(crate) fn is_object(&self) -> bool {
        matches!(self, J::Obj(_))
    }

    /// cJSON's `valueint`: truncated towards zero, saturated to `i32`.
    pub(crate) fn as_int(&self) -> Option<i32> {
        match self {
            J::Num(f) => Some(*f as i32),
            J::Int(i) => Some((*i).clamp(i32::MIN as i64, i32::MAX as i64) as i32),
            _ => None,
        }
    }

    /// A string field: `None` when absent or not a string (Mosquitto treats
    /// both as missing).
    pub(crate) fn str_field(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(J::as_str)
    }

    /// An optional integer field; absent or of another type = `default`.
    pub(crate) fn int_field(&self, key: &str, default: i32) -> i32 {
        self.get(key).and_then(J::as_int).unwrap_or(default)
    }

    /// An optional boolean field; absent or of another type = `default`.
    pub(crate) fn bool_field(&self, key: &str, default: bool) -> bool {
        self.get(key).and_then(J::as_bool).unwrap_or(default)
    }

    pub(crate) fn str(s: &str) -> J {
        J::Str(s.to_string())
    }

    /// Compact form, as cJSON_PrintUnformatted.
    pub(crate) fn to_compact(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, None);
        out
    }

    /// Tab-indented form, as cJSON_Print.
    pub(crate) fn to_pretty(&self) -> String {
        let mut out = String::new();
        self.write(&mut out, Some(0));
        out
    }

    fn write(&self, out: &mut String, indent: Option<usize>) {
        match self {
            J::Null => out.push_str("null"),
            J::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            J::Int(i) => {
                let _ = write!(out, "{i}");
            }
            J::Num(f) => {
                if f.is_finite() {
                    let _ = write!(out, "{f}");
                } else {
                    out.push_str("null");
                }
            }
            J::Str(s) => write_str(out, s),
            J::Arr(items) => {
                out.push('[');
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                        if indent.is_some() {
                            out.push(' ');
                        }
                    }
                    v.write(out, indent);
                }
                out.push(']');
            }
            J::Obj(items) => {
                out.push('{');
                let inner = indent.map(|d| d + 1);
                for (i, (k, v)) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    if let Some(d) = inner {
                        out.push('\n');
                        out.extend(std::iter::repeat_n('\t', d));
                    }
                    write_str(out, k);
                    out.push(':');
                    if inner.is_some() {
                        out.push('\t');
                    }
                    v.write(out, inner);
                }
                if let Some(d) = indent {
                    out.push('\n');
                    out.extend(std::iter::repeat_n('\t', d));
                }
                out.push('}');
            }
        }
    }
}

fn write_str(out: &mut String, s: &str) {
    // serde_json escapes exactly what cJSON escapes (", \, control chars).
    match serde_json::to_string(s) {
        Ok(q) => out.push_str(&q),
        Err(_) => out.push_str("\"\""),
    }
}

/// Builds an object from `(key, value)` pairs, in order.
pub(crate) fn obj(items: Vec<(&str, J)>) -> J {
    J::Obj(items.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

impl<'de> Deserialize<'de> for J {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<J, D::Error> {
        d.deserialize_any(JVisitor)
    }
}

struct JVisitor;

impl<'de> Visitor<'de> for JVisitor {
    type Value = J;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("JSON")
    }
    fn visit_unit<E>(self) -> Result<J, E> {
        Ok(J::Null)
    }
    fn visit_bool<E>(self, v: bool) -> Result<J, E> {
        Ok(J::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<J, E> {
        Ok(J::Int(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<J, E> {
        Ok(i64::try_from(v).map(J::Int).unwrap_or(J::Num(v as f64)))
    }
    fn visit_f64<E>(self, v: f64) -> Result<J, E> {
        Ok(J::Num(v))
    }
    // cJSON strings are C strings: an escaped U+0000 ends them.
    fn visit_str<E>(self, v: &str) -> Result<J, E> {
        Ok(J::Str(v.split('\0').next().unwrap_or_default().to_string()))
    }
    fn visit_string<E>(self, mut v: String) -> Result<J, E> {
        if let Some(i) = v.find('\0') {
            v.truncate(i);
        }
        Ok(J::Str(v))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(J::Arr(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<J, A::Error> {
        let mut items = Vec::new();
        while let Some((k, v)) = map.next_entry::<String, J>()? {
            items.push((k, v));
        }
        Ok(J::Obj(items))
    }
}
