//! The snapshot decoder must reject any input with an error, never panic, hang or allocate
//! beyond its limits. The decoder follows the compression named in the stream header, so one
//! service covers none, gzip and zstd.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migration::{Compression, SerializationConfig, SerializationService};
use std::sync::OnceLock;

fn service() -> &'static SerializationService {
    static SERVICE: OnceLock<SerializationService> = OnceLock::new();
    SERVICE.get_or_init(|| {
        SerializationService::new(SerializationConfig {
            compression: Compression::Zstd { level: 1 },
            chunk_size: 4096,
            max_state_size: 1 << 20,
        })
        .expect("valid config")
    })
}

fuzz_target!(|data: &[u8]| {
    if let Ok(snapshot) = service().decode_slice(data) {
        // Whatever decodes must survive a round trip unchanged.
        if let Ok(bytes) = service().encode_to_vec(&snapshot) {
            assert_eq!(service().decode_slice(&bytes).as_ref(), Ok(&snapshot));
        }
    }
});
