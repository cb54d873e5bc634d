pub mod cluster;
pub mod mount;
pub mod proxy;
pub mod ships;
pub mod tmpfs;
pub mod vere;
