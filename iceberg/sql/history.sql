-- chronolake history: every version recorded by {known_at}, system_to as of {known_at}.
SELECT {columns}, valid_from, valid_to, system_from,
       CASE WHEN min(system_to) <= {known_at} THEN min(system_to) ELSE {sentinel} END AS system_to,
       event_id
FROM {table}
WHERE row_kind IN ('open', 'closed')
  AND system_from <= {known_at}{key_filter}
GROUP BY {columns}, valid_from, valid_to, system_from, event_id
ORDER BY {keys}, valid_from, system_from
