//! `hearth-server`: everything is in [`hearth_server::main`], which `hearth serve` runs too.

fn main() {
    std::process::exit(hearth_server::main(std::env::args_os()));
}
