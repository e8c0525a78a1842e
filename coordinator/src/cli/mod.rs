pub mod model;
pub mod place;
pub mod trace;
