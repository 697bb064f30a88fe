//! The local node's pause process (tests/node.sh builds it statically into the pause image):
//! the first process of every Pod sandbox. It holds the Pod's namespaces, reaps the orphans
//! handed to it when the Pod shares its process namespace, and exits on SIGINT or SIGTERM.
//! As PID 1 it gets no default signal actions, so the signals are taken synchronously.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--version") {
        println!("pause {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let mut signals = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        signals.add(signal);
    }
    if let Err(error) = signals.thread_block() {
        eprintln!("pause: cannot block signals: {error}");
        std::process::exit(1);
    }
    loop {
        match signals.wait() {
            Ok(Signal::SIGCHLD) => reap(),
            Ok(_) => std::process::exit(0),
            Err(error) => {
                eprintln!("pause: waiting for a signal failed: {error}");
                std::process::exit(1);
            }
        }
    }
}

/// Collects every child that has exited (SIGCHLD coalesces).
fn reap() {
    while let Ok(status) = waitpid(None, Some(WaitPidFlag::WNOHANG)) {
        if status == WaitStatus::StillAlive {
            break;
        }
    }
}
