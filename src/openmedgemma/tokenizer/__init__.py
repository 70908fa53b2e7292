"""openmedgemma.tokenizer"""
