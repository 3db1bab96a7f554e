//! Bad input: one line naming the thing, a non-zero exit, the node as it was.
