//! Port-I/O devices of the PC platform that a husk guest uses: the 16550 serial console
//! ([`serial`], off unless debugging), the i8042 controller whose reset line is the guest's
//! reboot ([`i8042`]), and husk's own boot-marker port ([`marker`]).

pub mod i8042;
pub mod marker;
pub mod serial;
