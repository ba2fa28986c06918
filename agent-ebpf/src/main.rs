//! CortexFlow kernel programs.
//!
//! Built for `bpfel-unknown-none` by `agent/build.rs` (aya-build) and embedded in the agent.
//! Every program is a thin entry point around a `try_` function; every packet read is bounds
//! checked and nothing here may panic (the verifier rejects reachable panics).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

/// Placeholder TC program: lets every packet through. Replaced by the policy datapath.
#[classifier]
pub fn cf_tc_pass(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic, so this is never reached.
    unsafe { core::hint::unreachable_unchecked() }
}
