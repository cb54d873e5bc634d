pub mod cluster;
pub mod mount;
pub mod proxy;
pub mod tmpfs;
pub mod vere;
