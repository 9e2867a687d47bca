#![no_std]
#![no_main]
// placeholder, replaced by the data-plane work
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! { loop {} }
