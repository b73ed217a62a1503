"""Built-in tokenizers and quantizers, registered through the same plugin hooks a third party uses."""
