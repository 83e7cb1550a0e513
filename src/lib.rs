//! nvcopy copier (placeholder)
