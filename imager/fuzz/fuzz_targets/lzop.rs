#![no_main]
use aula_fuzz as _;

libfuzzer_sys::fuzz_target!(|data: &[u8]| aula_imager::fuzzing::lzop(data));
