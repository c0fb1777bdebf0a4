//! nf_tables through libnftables, in-process: each call is one atomic transaction and
//! spawns no process.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::io;

#[link(name = "nftables")]
unsafe extern "C" {
    fn nft_ctx_new(flags: u32) -> *mut c_void;
    fn nft_ctx_free(ctx: *mut c_void);
    fn nft_ctx_buffer_output(ctx: *mut c_void) -> c_int;
    fn nft_ctx_buffer_error(ctx: *mut c_void) -> c_int;
    fn nft_ctx_get_output_buffer(ctx: *mut c_void) -> *const c_char;
    fn nft_ctx_get_error_buffer(ctx: *mut c_void) -> *const c_char;
    fn nft_run_cmd_from_buffer(ctx: *mut c_void, buf: *const c_char) -> c_int;
}

/// An error from nft, with its first message line.
#[derive(Debug, thiserror::Error)]
#[error("nftables: {msg}")]
pub struct NftError {
    pub msg: String,
}

impl NftError {
    /// The object (table, map, element) the transaction names does not exist.
    pub fn is_missing(&self) -> bool {
        self.msg.contains("No such file or directory")
    }
}

/// One libnftables context, bound to the netns it is used in.
pub struct Nft {
    ctx: *mut c_void,
}

impl Nft {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain constructor; a null return is handled.
        let ctx = unsafe { nft_ctx_new(0) };
        if ctx.is_null() {
            return Err(io::Error::other("nft_ctx_new failed"));
        }
        // SAFETY: ctx is valid; these only switch output to in-memory buffers.
        unsafe {
            nft_ctx_buffer_output(ctx);
            nft_ctx_buffer_error(ctx);
        }
        Ok(Nft { ctx })
    }

    /// Runs a script as one transaction: all of it applies, or none of it.
    pub fn run(&mut self, script: &str) -> Result<String, NftError> {
        let c = CString::new(script).map_err(|_| NftError {
            msg: "script contains a NUL byte".into(),
        })?;
        // SAFETY: ctx valid, c is a NUL-terminated string that outlives the call; the
        // returned buffers are owned by ctx and copied before the next call.
        unsafe {
            let rc = nft_run_cmd_from_buffer(self.ctx, c.as_ptr());
            let out = cstr(nft_ctx_get_output_buffer(self.ctx));
            let err = cstr(nft_ctx_get_error_buffer(self.ctx));
            if rc != 0 {
                let msg = err
                    .lines()
                    .find(|l| l.starts_with("Error:"))
                    .map(|l| l.trim_start_matches("Error: ").to_string())
                    .unwrap_or_else(|| err.trim().to_string());
                return Err(NftError { msg });
            }
            Ok(out)
        }
    }
}

unsafe fn cstr(p: *const c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: libnftables returns NUL-terminated buffers.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

impl Drop for Nft {
    fn drop(&mut self) {
        // SAFETY: ctx came from nft_ctx_new and is freed once.
        unsafe { nft_ctx_free(self.ctx) }
    }
}
