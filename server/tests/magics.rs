//! The magics table (shared by the kernel and the REPL) against the real server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{home, Server};
use hearth::{AdamParams, Session};
use hearth_cells::magics;

#[test]
fn every_magic_answers_against_a_real_server() {
    let h = home("magics");
    let _server = Server::start(&h, &["--idle-timeout", "0", "--autosave-every", "0"]);
    let s = Session::connect_home(&h, "main").unwrap();
    let d = s.supervised("ab", "cd").unwrap();
    for _ in 0..3 {
        s.forward_backward(std::slice::from_ref(&d)).unwrap();
        s.optim_step(&AdamParams::default()).unwrap();
    }
    let text = |line: &str| magics::run(line, &s).unwrap().unwrap().data["text/plain"].clone();
    assert!(text(":status").contains("model tiny (llama"), "{}", text(":status"));
    assert!(text(":runs").contains("main"));
    assert!(text(":save").contains("at step 3"));
    let plot = magics::run(":plot", &s).unwrap().unwrap();
    assert!(plot.data["image/svg+xml"].contains("<svg"));
    assert!(magics::run(":plot all", &s).unwrap().unwrap().data.contains_key("image/svg+xml"));
    let table = magics::run(":sample ab", &s).unwrap().unwrap();
    assert!(table.data["text/html"].contains("<table"));
    s.forward_backward(std::slice::from_ref(&d)).unwrap();
    s.optim_step(&AdamParams::default()).unwrap();
    assert!(text(":resume").contains("at step 3 again"), "{}", text(":resume"));
    assert!(text(":help").contains(":resume"));
    assert_eq!(magics::run(":sample", &s).unwrap().unwrap_err(), "usage: :sample <prompt>");
    assert!(magics::run(":dep serde", &s).is_none());
}
