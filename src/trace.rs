//! Step timings for diagnosing a slow hook: with `NETSHIM_TRACE=1` in the hook's environment,
//! each marked step's duration goes to stderr as `shim: trace: <step> <µs>`.

use std::cell::RefCell;
use std::time::Instant;

thread_local! {
    static LAST: RefCell<Option<Instant>> = const { RefCell::new(None) };
}

/// Starts timing if `NETSHIM_TRACE` is set (non-empty, not "0").
pub fn init() {
    let on = std::env::var_os("NETSHIM_TRACE").is_some_and(|v| !v.is_empty() && v != "0");
    if on {
        LAST.with(|l| *l.borrow_mut() = Some(Instant::now()));
    }
}

/// Reports the time since the previous mark under `step`.
pub fn mark(step: &str) {
    LAST.with(|l| {
        let mut l = l.borrow_mut();
        if let Some(prev) = *l {
            let now = Instant::now();
            eprintln!(
                "shim: trace: {step} {}",
                now.duration_since(prev).as_micros()
            );
            *l = Some(now);
        }
    });
}
