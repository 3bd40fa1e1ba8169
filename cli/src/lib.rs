//! The `seawall` tool's parts, as a library so its tests can reach them: finding plugin configs in
//! files ([`input`]), checking them with the filter's own code ([`check`]), explaining a request
//! ([`explain`]), and showing the results ([`output`]). `main.rs` is only the command line.

pub mod check;
pub mod explain;
pub mod input;
pub mod output;

/// `println!` that ignores a closed standard output (`seawall explain ... | head`): the tool then
/// stops quietly, as command-line tools do, instead of panicking on the broken pipe.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
