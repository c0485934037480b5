//! mgpo-candle: work in progress (see its issue).
