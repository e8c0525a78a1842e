//! Switchyard worker: model loading and execution (in progress).
