//! Is a cell complete? A bracket-, string- and comment-aware scan of Rust source, shared by the
//! kernel (`is_complete_request`) and the REPL (multi-line input).

/// What the scan decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Completeness {
    /// Ready to run.
    Complete,
    /// More input is needed; the indent to continue with.
    Incomplete(String),
    /// Cannot become valid by adding input (a closing bracket without its opener).
    Invalid,
}

/// Scans `code`: unclosed brackets, strings, char literals or block comments mean incomplete; a
/// mismatched closing bracket means invalid. Lines starting with `:` are magics (complete).
pub fn is_complete(code: &str) -> Completeness {
    if code.trim_start().starts_with(':') {
        return Completeness::Complete;
    }
    let b = code.as_bytes();
    let mut stack: Vec<u8> = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        match c {
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                // block comments nest in Rust
                let mut depth = 1;
                i += 2;
                while i < b.len() && depth > 0 {
                    if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                        depth += 1;
                        i += 2;
                    } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                        depth -= 1;
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                if depth > 0 {
                    return Completeness::Incomplete(String::new());
                }
                continue;
            }
            b'r' if is_raw_string_start(b, i) => {
                let mut j = i + 1;
                let mut hashes = 0;
                while b.get(j) == Some(&b'#') {
                    hashes += 1;
                    j += 1;
                }
                j += 1; // the opening quote
                let closing: Vec<u8> = std::iter::once(b'"').chain(std::iter::repeat_n(b'#', hashes)).collect();
                match find(&b[j..], &closing) {
                    Some(k) => i = j + k + closing.len(),
                    None => return Completeness::Incomplete(String::new()),
                }
                continue;
            }
            b'"' => {
                i += 1;
                loop {
                    match b.get(i) {
                        None => return Completeness::Incomplete(String::new()),
                        Some(b'\\') => i += 2,
                        Some(b'"') => break,
                        Some(_) => i += 1,
                    }
                }
            }
            b'\'' => {
                // a char literal ('a', '\n', '\u{1F600}') or a lifetime ('a)
                if b.get(i + 1) == Some(&b'\\') {
                    let mut j = i + 2;
                    while j < b.len() && b[j] != b'\'' && b[j] != b'\n' {
                        j += 1;
                    }
                    if j >= b.len() {
                        return Completeness::Incomplete(String::new());
                    }
                    i = j;
                } else {
                    let ch_len = code[i + 1..].chars().next().map_or(0, char::len_utf8);
                    if b.get(i + 1 + ch_len) == Some(&b'\'') {
                        i += 1 + ch_len;
                    }
                }
            }
            b'(' | b'[' | b'{' => stack.push(c),
            b')' | b']' | b'}' => {
                let want = match c {
                    b')' => b'(',
                    b']' => b'[',
                    _ => b'{',
                };
                if stack.pop() != Some(want) {
                    return Completeness::Invalid;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if stack.is_empty() {
        Completeness::Complete
    } else {
        Completeness::Incomplete("    ".repeat(stack.len()))
    }
}

fn is_raw_string_start(b: &[u8], i: usize) -> bool {
    // r"…" or r#"…"# (also br"…"), not part of an identifier like `bar"`
    let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_') && !(b[i - 1] == b'b' && (i < 2 || !b[i - 2].is_ascii_alphanumeric()));
    if prev_ident {
        return false;
    }
    let mut j = i + 1;
    while b.get(j) == Some(&b'#') {
        j += 1;
    }
    b.get(j) == Some(&b'"')
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_incomplete_invalid() {
        for code in ["1 + 1", "let x = vec![1, 2];", "fn f() { \"}\" }", "let c = '{';", "fn f<'a>(x: &'a str) {}", "// {\n1", "/* { */ 1", "let s = r#\"{ \" }\"#;", ":dep foo", "'\\n'", "let b = br\"{\";"] {
            assert_eq!(is_complete(code), Completeness::Complete, "{code}");
        }
        for code in ["fn f() {", "let x = (1,", "let s = \"abc", "/* open", "/* /* */", "let s = r#\"abc\"", "for i in 0..3 {\n  if i > 1 {"] {
            assert!(matches!(is_complete(code), Completeness::Incomplete(_)), "{code}");
        }
        assert_eq!(is_complete("for i in 0..3 {\n  if i > 1 {"), Completeness::Incomplete("        ".into()));
        for code in ["1 + 1)", "fn f() { ] }", "}"] {
            assert_eq!(is_complete(code), Completeness::Invalid, "{code}");
        }
    }
}
