"""Location tokenizers (the paper's ``tokenizers/``, renamed so it does not shadow Hugging Face
``tokenizers``): RQ-VAE modules, collision-free code assignment, token strings and the trie of valid
codes. Filled in by the tokenizer stage."""
