//! mgpo-dfdx: work in progress (see its issue).
