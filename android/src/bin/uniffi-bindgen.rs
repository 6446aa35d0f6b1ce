//! Generates the Kotlin bindings from the built library:
//! `cargo run -p privcomm-client --features bindgen --bin uniffi-bindgen -- generate --library target/debug/libprivcomm_client.so --language kotlin --out-dir OUT`.

fn main() {
    uniffi::uniffi_bindgen_main()
}
