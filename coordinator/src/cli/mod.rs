pub mod admin;
pub mod bench_cluster;
pub mod cluster;
pub mod ha;
pub mod model;
pub mod place;
pub mod routing;
pub mod trace;
