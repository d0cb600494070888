//! The marker lines of the cell process, typed. The prelude writes them (`hearth::display`:
//! [`MARKER`] + JSON, one line): displays on stdout, in order with what the cell prints; errors on
//! stderr. [`Marker::parse`] is the only reader; the runner hands what it finds to the front-end.

use hearth::display::MARKER;
use std::collections::BTreeMap;

/// A display to show, or to update in place.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Display {
    /// Content by MIME type, including the types only hearth's front-ends read
    /// ([`hearth::display::front_end_only`]): the kernel drops those, the terminal draws them.
    pub data: BTreeMap<String, String>,
    /// Set for displays updated in place (progress bars).
    pub display_id: Option<String>,
    /// Replaces the display shown earlier with the same `display_id` instead of adding one.
    pub update: bool,
}

/// One marker line of the cell process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Marker {
    /// `Bundle::show` / `Bundle::update`.
    Display(Display),
    /// `hearth::clear_output(wait)`: clear the cell's output (`wait`: when the next output
    /// arrives). A terminal keeps its scrollback and ignores it.
    Clear {
        /// Clear when the next output arrives, not now.
        wait: bool,
    },
    /// The cell fails with this error (the panic hook, a `?` that stopped the cell).
    Error {
        /// Short name (`Panic`, `Error`).
        ename: String,
        /// The message.
        evalue: String,
    },
}

impl Marker {
    /// The marker of `line`, or `None` when it is not one: no [`MARKER`] prefix, or JSON that does
    /// not parse (such a line is shown as it is). An object with `error` is an error, else one with
    /// `"clear": true` a clear, else a display (missing fields read as empty, absent, `false`).
    pub fn parse(line: &str) -> Option<Marker> {
        let json = line.strip_prefix(MARKER)?;
        let v = serde_json::from_str::<serde_json::Value>(json).ok()?;
        if let Some(e) = v.get("error") {
            return Some(Marker::Error {
                ename: e["ename"].as_str().unwrap_or("Error").into(),
                evalue: e["evalue"].as_str().unwrap_or_default().into(),
            });
        }
        if v["clear"] == true {
            return Some(Marker::Clear { wait: v["wait"] == true });
        }
        Some(Marker::Display(Display {
            data: serde_json::from_value(v["data"].clone()).unwrap_or_default(),
            display_id: v["display_id"].as_str().map(str::to_string),
            update: v["update"] == true,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hearth::display::{clear_marker, error_marker, PROGRESS_MIME};
    use hearth::Bundle;

    #[test]
    fn what_the_prelude_writes_parses_back() {
        let bundle = Bundle { display_id: Some("bar-1".into()), ..Bundle::text("3/3").with(PROGRESS_MIME, "{}") };
        for update in [false, true] {
            let want = Display { data: bundle.data.clone(), display_id: Some("bar-1".into()), update };
            assert_eq!(Marker::parse(&bundle.marker_line(update)), Some(Marker::Display(want)));
        }
        let plain = Bundle::text("hi");
        assert_eq!(
            Marker::parse(&plain.marker_line(false)),
            Some(Marker::Display(Display { data: plain.data, display_id: None, update: false }))
        );
        assert_eq!(Marker::parse(&clear_marker(true)), Some(Marker::Clear { wait: true }));
        assert_eq!(Marker::parse(&clear_marker(false)), Some(Marker::Clear { wait: false }));
        assert_eq!(
            Marker::parse(&error_marker("Panic", "panicked at a.rs:1: no")),
            Some(Marker::Error { ename: "Panic".into(), evalue: "panicked at a.rs:1: no".into() })
        );
    }

    #[test]
    fn lines_that_are_not_markers_are_none() {
        assert_eq!(Marker::parse("plain output"), None);
        assert_eq!(Marker::parse(""), None);
        assert_eq!(Marker::parse(&format!("{MARKER}{{not json")), None);
        assert_eq!(Marker::parse(&format!("x{MARKER}{{}}")), None, "the marker must start the line");
    }

    #[test]
    fn missing_fields_read_as_empty() {
        assert_eq!(
            Marker::parse(&format!(r#"{MARKER}{{"error": {{}}}}"#)),
            Some(Marker::Error { ename: "Error".into(), evalue: String::new() })
        );
        assert_eq!(Marker::parse(&format!(r#"{MARKER}{{"clear": true}}"#)), Some(Marker::Clear { wait: false }));
        // an error wins over everything else in the same object
        assert!(matches!(
            Marker::parse(&format!(r#"{MARKER}{{"clear": true, "error": {{"ename": "E"}}}}"#)),
            Some(Marker::Error { .. })
        ));
        assert_eq!(Marker::parse(&format!("{MARKER}{{}}")), Some(Marker::Display(Display::default())));
        // a data map that is not text by MIME type shows nothing rather than failing the cell
        assert_eq!(
            Marker::parse(&format!(r#"{MARKER}{{"data": {{"text/plain": 5}}, "update": true}}"#)),
            Some(Marker::Display(Display { update: true, ..Display::default() }))
        );
    }
}
