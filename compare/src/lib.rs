//! compare-all: forkd side by side with other sandboxes (see its issue).
