//! Is a cell complete? A bracket-, string- and comment-aware scan of Rust source, shared by the
//! kernel (`is_complete_request`) and the REPL (multi-line input, pasted blocks, lines typed
//! ahead): both decide through [`split_typed`] / [`input_status`], so they agree.

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

/// Splits text into cells exactly as the REPL takes it typed line by line, each line ended by
/// Enter: a line starts a cell unless a cell is still open; a cell ends at the first line where
/// it is complete (or invalid: it runs and shows its error); blank lines between cells are
/// skipped. So a `:magic` is a magic only as the first line of a cell (inside an open block it
/// is code), and `let a = 1;` followed by `a + 1` are two cells. Returns the cells and the open
/// cell left at the end (empty when none), which the REPL keeps in its editor.
pub fn split_typed(text: &str) -> (Vec<String>, String) {
    let mut cells = Vec::new();
    let mut cur = String::new();
    for line in text.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if cur.is_empty() {
            if line.trim().is_empty() {
                continue;
            }
        } else {
            cur.push('\n');
        }
        cur.push_str(line);
        if !matches!(is_complete(&cur), Completeness::Incomplete(_)) {
            cells.push(std::mem::take(&mut cur).trim_end().to_string());
        }
    }
    (cells, cur)
}

/// What the REPL does with `text` on Enter, as the kernel's `is_complete_reply`: `Incomplete`
/// when a cell is left open (with the indent to continue it), `Invalid` when a cell cannot
/// become valid (it runs and fails), else `Complete`.
pub fn input_status(text: &str) -> Completeness {
    let (cells, open) = split_typed(text);
    if !open.is_empty() {
        return is_complete(&open);
    }
    if cells.iter().any(|c| is_complete(c) == Completeness::Invalid) {
        return Completeness::Invalid;
    }
    Completeness::Complete
}

fn is_raw_string_start(b: &[u8], i: usize) -> bool {
    // r"…" or r#"…"# (also br"…"), not part of an identifier like `bar"`
    let prev_ident = i > 0
        && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_')
        && !(b[i - 1] == b'b' && (i < 2 || !b[i - 2].is_ascii_alphanumeric()));
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
        for code in [
            "1 + 1",
            "let x = vec![1, 2];",
            "fn f() { \"}\" }",
            "let c = '{';",
            "fn f<'a>(x: &'a str) {}",
            "// {\n1",
            "/* { */ 1",
            "let s = r#\"{ \" }\"#;",
            ":dep foo",
            "'\\n'",
            "let b = br\"{\";",
        ] {
            assert_eq!(is_complete(code), Completeness::Complete, "{code}");
        }
        for code in [
            "fn f() {",
            "let x = (1,",
            "let s = \"abc",
            "/* open",
            "/* /* */",
            "let s = r#\"abc\"",
            "for i in 0..3 {\n  if i > 1 {",
        ] {
            assert!(matches!(is_complete(code), Completeness::Incomplete(_)), "{code}");
        }
        assert_eq!(is_complete("for i in 0..3 {\n  if i > 1 {"), Completeness::Incomplete("        ".into()));
        for code in ["1 + 1)", "fn f() { ] }", "}"] {
            assert_eq!(is_complete(code), Completeness::Invalid, "{code}");
        }
    }

    #[test]
    fn typed_lines_split_into_cells_as_the_repl_takes_them() {
        let quickstart = ":sample hello\nlet d = session.supervised(\"a\", \"b\")?;\nfor _ in 0..3 {\n    session.forward_backward(&[d.clone()])?;\n\n    session.optim_step(&AdamParams::default())?;\n}\n\n:status\n";
        let (cells, open) = split_typed(quickstart);
        assert_eq!(
            cells,
            vec![
                ":sample hello",
                "let d = session.supervised(\"a\", \"b\")?;",
                "for _ in 0..3 {\n    session.forward_backward(&[d.clone()])?;\n\n    session.optim_step(&AdamParams::default())?;\n}",
                ":status"
            ]
        );
        assert!(open.is_empty());
        // a `:` line inside an open block is code; the block stays open at the end
        let (cells, open) = split_typed("let v = [\n:x,\n");
        assert!(cells.is_empty());
        assert_eq!(open, "let v = [\n:x,\n");
        assert_eq!(input_status("let v = [\n:x,\n"), Completeness::Incomplete("    ".into()));
        // CRLF from a paste
        assert_eq!(split_typed("1 + 1\r\n2 + 2\r\n").0, vec!["1 + 1", "2 + 2"]);
        assert_eq!(input_status(":status\nfn f() {"), Completeness::Incomplete("    ".into()));
        assert_eq!(input_status(":status\n1 + 1"), Completeness::Complete);
        assert_eq!(input_status("1 + 1)\n2"), Completeness::Invalid);
        assert_eq!(input_status(""), Completeness::Complete);
    }
}
