"""batch_compat"""
