//! SQLite's memory allocations through mimalloc, without SQLite's global
//! allocation-statistics mutex.
//!
//! SQLite (bundled by sqlx) allocates through the C library's `malloc` and,
//! by default, takes one process-wide mutex around every allocation to keep
//! statistics nobody here reads. A replay reads the log on one SQLite
//! connection and writes read models on another, and `perf` showed the two
//! threads queueing on that mutex and in glibc's `malloc_consolidate` (about
//! a fifth of a replay's CPU). [`install`] routes SQLite's allocator to
//! mimalloc (the process's Rust allocator too) and turns the statistics off.
//!
//! It must run before the first SQLite connection opens; later it changes
//! nothing (SQLite refuses reconfiguration once initialised) and says so.

// The FFI layer: SQLite's C configuration interface (STYLE.md allows
// `unsafe` here and nowhere else in this crate).
#![allow(unsafe_code)]

use libsqlite3_sys as sqlite;
use std::ffi::{c_int, c_void};

unsafe extern "C" fn allocate(bytes: c_int) -> *mut c_void {
    // SAFETY: mimalloc's malloc; SQLite never asks for a negative size.
    unsafe { libmimalloc_sys::mi_malloc(bytes.max(0) as usize) }
}

unsafe extern "C" fn free(pointer: *mut c_void) {
    // SAFETY: `pointer` came from `allocate` or `reallocate` (or is null).
    unsafe { libmimalloc_sys::mi_free(pointer) }
}

unsafe extern "C" fn reallocate(pointer: *mut c_void, bytes: c_int) -> *mut c_void {
    // SAFETY: as `free`; mimalloc keeps the contents up to the smaller size.
    unsafe { libmimalloc_sys::mi_realloc(pointer, bytes.max(0) as usize) }
}

unsafe extern "C" fn size(pointer: *mut c_void) -> c_int {
    // SAFETY: `pointer` is a live allocation of `allocate`/`reallocate`.
    let usable = unsafe { libmimalloc_sys::mi_usable_size(pointer) };
    c_int::try_from(usable).unwrap_or(c_int::MAX)
}

unsafe extern "C" fn round_up(bytes: c_int) -> c_int {
    // SQLite asks for sizes it may then use in full; mimalloc serves 8-byte multiples at least.
    bytes.saturating_add(7) & !7
}

unsafe extern "C" fn init(_: *mut c_void) -> c_int {
    sqlite::SQLITE_OK
}

unsafe extern "C" fn shutdown(_: *mut c_void) {}

/// Configures SQLite's allocator; call before any SQLite connection opens.
/// Returns whether SQLite took the configuration.
pub fn install() -> bool {
    let methods = sqlite::sqlite3_mem_methods {
        xMalloc: Some(allocate),
        xFree: Some(free),
        xRealloc: Some(reallocate),
        xSize: Some(size),
        xRoundup: Some(round_up),
        xInit: Some(init),
        xShutdown: Some(shutdown),
        pAppData: std::ptr::null_mut(),
    };
    // SAFETY: both options take the documented argument types (an int; a
    // pointer to sqlite3_mem_methods, which SQLite copies before returning).
    // SQLite answers SQLITE_MISUSE, changing nothing, once it is initialised.
    let (statistics, allocator) = unsafe {
        (
            sqlite::sqlite3_config(sqlite::SQLITE_CONFIG_MEMSTATUS, 0 as c_int),
            sqlite::sqlite3_config(sqlite::SQLITE_CONFIG_MALLOC, &methods as *const sqlite::sqlite3_mem_methods),
        )
    };
    statistics == sqlite::SQLITE_OK && allocator == sqlite::SQLITE_OK
}
