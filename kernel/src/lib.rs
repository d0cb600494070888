//! The front-end side shared by hearth's Jupyter kernel and its REPL: deciding whether a cell is
//! complete ([`scanner`]) and the magics table ([`magics`]). (The kernel binary itself is being
//! built in issue 5.)

pub mod magics;
pub mod scanner;
