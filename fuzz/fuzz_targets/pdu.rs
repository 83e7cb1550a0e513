//! Arbitrary bytes through the NVMe/TCP PDU parsers, as a controller (or a host, for
//! ICReq) could send them. The body and the input layout are
//! `nvcopy_tcp::fuzz::parse_any`, in the crate so that the stable-toolchain corpus test
//! runs the same checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    nvcopy_tcp::fuzz::parse_any(data);
});
