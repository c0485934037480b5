//! mgpo-tch: work in progress (see its issue).
