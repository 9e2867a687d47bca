//! placeholder: the embedded XDP object (data-plane work fills this in).
