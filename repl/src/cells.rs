//! Splitting a script into cells, the way a person would type it into the REPL: a cell ends at a
//! blank line once its code is complete (by hearth-cells' scanner), and a `:command` line at the
//! start of a cell is a cell of its own. A first line starting with `#!` (not `#![`) is skipped,
//! so a script can be executable with `#!/usr/bin/env -S hearth run`.

use hearth_cells::scanner::{is_complete, Completeness};

/// The cells of `script`, in order, each without its trailing blank lines.
pub fn split(script: &str) -> Vec<String> {
    let mut cells = Vec::new();
    let mut cur = String::new();
    let done = |cur: &str| cur.trim().is_empty() || !matches!(is_complete(cur), Completeness::Incomplete(_));
    for (i, line) in script.lines().enumerate() {
        if i == 0 && line.starts_with("#!") && !line.starts_with("#![") {
            continue;
        }
        if line.trim_start().starts_with(':') && done(&cur) {
            push(&mut cells, &mut cur);
            cells.push(line.trim().to_string());
            continue;
        }
        if line.trim().is_empty() && done(&cur) {
            push(&mut cells, &mut cur);
            continue;
        }
        cur += line;
        cur.push('\n');
    }
    push(&mut cells, &mut cur);
    cells
}

fn push(cells: &mut Vec<String>, cur: &mut String) {
    let cell = std::mem::take(cur);
    if !cell.trim().is_empty() {
        cells.push(cell.trim_end().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_end_at_blank_lines_when_complete() {
        let script = "#!/usr/bin/env -S hearth run\nlet x = 1;\nlet y = 2;\n\nfor i in 0..3 {\n    println!(\"{i}\");\n\n    let z = i;\n}\n:status\nx + y\n";
        assert_eq!(
            split(script),
            vec![
                "let x = 1;\nlet y = 2;",
                "for i in 0..3 {\n    println!(\"{i}\");\n\n    let z = i;\n}",
                ":status",
                "x + y"
            ]
        );
        assert_eq!(split("#![allow(unused)]\nlet a = 1;"), vec!["#![allow(unused)]\nlet a = 1;"]);
        assert!(split("\n\n").is_empty());
        // a `:` inside an open block is code, not a command
        assert_eq!(split("let s = [\n:x\n];"), vec!["let s = [\n:x\n];"]);
    }
}
