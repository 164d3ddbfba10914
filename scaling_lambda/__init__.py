"""scaling_lambda"""
