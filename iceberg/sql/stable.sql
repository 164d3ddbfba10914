-- chronolake stable system time: every transaction at or before it is committed.
SELECT max(system_from) AS stable_system_time
FROM {table}
WHERE row_kind = 'control'
