//! Text that reaches a terminal or a log: every control character escaped, so a container id or
//! an annotation value written by a tenant can never move the cursor, clear the screen or forge
//! a log line (C0, DEL and C1, U+009B "CSI" included, which JSON leaves raw).

use std::fmt::Write;

/// `s` with each control character as `\u00XX` (or `\u{XXXX}` above 0xff); the rest unchanged.
pub fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            let _ = write!(out, "\\u{:04x}", u32::from(c));
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_of_every_range_are_escaped() {
        assert_eq!(escape_controls("plain id"), "plain id");
        assert_eq!(escape_controls("a\u{1b}]0;x\u{7}b"), "a\\u001b]0;x\\u0007b");
        assert_eq!(
            escape_controls("\r\n\u{7f}\u{9b}"),
            "\\u000d\\u000a\\u007f\\u009b"
        );
    }
}
