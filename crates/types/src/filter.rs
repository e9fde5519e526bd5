//! Payload filters: match and range conditions combined by and/or/not.

use crate::error::{ApiError, quote};
use crate::limits::{MAX_FILTER_CONDITIONS, MAX_FILTER_DEPTH, MAX_KEY_BYTES, MAX_PAYLOAD_BYTES};
use crate::point::{Payload, Value};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Filter {
    Condition(Condition),
    And(Vec<Filter>),
    Or(Vec<Filter>),
    Not(Box<Filter>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Condition {
    Match { key: String, value: Value },
    Range { key: String, range: Range },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Range {
    pub gt: Option<f64>,
    pub gte: Option<f64>,
    pub lt: Option<f64>,
    pub lte: Option<f64>,
}

impl Range {
    fn contains(&self, x: f64) -> bool {
        self.gt.is_none_or(|b| x > b) && self.gte.is_none_or(|b| x >= b) && self.lt.is_none_or(|b| x < b) && self.lte.is_none_or(|b| x <= b)
    }
}

impl Filter {
    pub fn matches(&self, payload: &Payload) -> bool {
        match self {
            Filter::Condition(c) => c.matches(payload),
            Filter::And(fs) => fs.iter().all(|f| f.matches(payload)),
            Filter::Or(fs) => fs.iter().any(|f| f.matches(payload)),
            Filter::Not(f) => !f.matches(payload),
        }
    }

    /// Bounds depth and size so a filter cannot make every candidate check costly,
    /// and rejects conditions that can never be meant (empty keys, NaN bounds).
    pub fn validate(&self) -> Result<(), ApiError> {
        let mut conditions = 0;
        self.validate_at(1, "filter", &mut conditions)
    }

    fn validate_at(&self, depth: usize, path: &str, conditions: &mut usize) -> Result<(), ApiError> {
        if depth > MAX_FILTER_DEPTH {
            return Err(ApiError::invalid(format!(
                "{path}: filter nests deeper than {MAX_FILTER_DEPTH} levels"
            )));
        }
        match self {
            Filter::Condition(c) => {
                *conditions += 1;
                if *conditions > MAX_FILTER_CONDITIONS {
                    return Err(ApiError::invalid(format!(
                        "filter has more than {MAX_FILTER_CONDITIONS} conditions"
                    )));
                }
                c.validate(path)
            }
            Filter::And(fs) | Filter::Or(fs) => {
                let op = if matches!(self, Filter::And(_)) { "and" } else { "or" };
                if fs.is_empty() {
                    return Err(ApiError::invalid(format!("{path}.{op} is empty: give at least one filter")));
                }
                for (i, f) in fs.iter().enumerate() {
                    f.validate_at(depth + 1, &format!("{path}.{op}[{i}]"), conditions)?;
                }
                Ok(())
            }
            Filter::Not(f) => f.validate_at(depth + 1, &format!("{path}.not"), conditions),
        }
    }
}

impl Condition {
    pub fn matches(&self, payload: &Payload) -> bool {
        match self {
            Condition::Match { key, value } => match (payload.get(key), value) {
                (Some(have), want) => match (have.as_f64(), want.as_f64()) {
                    (Some(a), Some(b)) => a == b,
                    _ => have == want,
                },
                (None, _) => false,
            },
            Condition::Range { key, range } => payload.get(key).and_then(Value::as_f64).is_some_and(|x| range.contains(x)),
        }
    }

    fn validate(&self, path: &str) -> Result<(), ApiError> {
        let key = match self {
            Condition::Match { key, value } => {
                if let Value::Double(d) = value
                    && !d.is_finite()
                {
                    return Err(ApiError::invalid(format!("{path}.match on {} is not a finite number", quote(key))));
                }
                key
            }
            Condition::Range { key, range } => {
                let bounds = [range.gt, range.gte, range.lt, range.lte];
                if bounds.iter().all(Option::is_none) {
                    return Err(ApiError::invalid(format!(
                        "{path}.range on {} has no bound: set gt, gte, lt or lte",
                        quote(key)
                    )));
                }
                if bounds.iter().flatten().any(|b| !b.is_finite()) {
                    return Err(ApiError::invalid(format!(
                        "{path}.range on {} has a bound that is not a finite number",
                        quote(key)
                    )));
                }
                key
            }
        };
        if key.is_empty() {
            return Err(ApiError::invalid(format!("{path}: condition key is empty: name a payload field")));
        }
        // No stored key is longer, so a longer one could never match.
        if key.len() > MAX_KEY_BYTES {
            return Err(ApiError::invalid(format!(
                "{path}: condition key {} is {} bytes: payload keys are at most {MAX_KEY_BYTES}",
                quote(key),
                key.len()
            )));
        }
        if let Condition::Match {
            value: Value::String(v), ..
        } = self
            && v.len() > MAX_PAYLOAD_BYTES
        {
            return Err(ApiError::invalid(format!(
                "{path}.match on {} is a string of {} bytes: payloads are at most {MAX_PAYLOAD_BYTES}",
                quote(key),
                v.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload() -> Payload {
        [
            ("age".to_string(), Value::Integer(40)),
            ("country".to_string(), Value::String("fr".into())),
        ]
        .into()
    }
    fn m(key: &str, v: Value) -> Filter {
        Filter::Condition(Condition::Match { key: key.into(), value: v })
    }
    fn r(key: &str, range: Range) -> Filter {
        Filter::Condition(Condition::Range { key: key.into(), range })
    }

    #[test]
    fn evaluates_match_range_and_or_not() {
        let p = payload();
        assert!(m("country", Value::String("fr".into())).matches(&p));
        assert!(m("age", Value::Double(40.0)).matches(&p));
        assert!(!m("missing", Value::Bool(true)).matches(&p));
        assert!(
            r(
                "age",
                Range {
                    gte: Some(40.0),
                    lt: Some(41.0),
                    ..Default::default()
                }
            )
            .matches(&p)
        );
        assert!(
            !r(
                "age",
                Range {
                    gt: Some(40.0),
                    ..Default::default()
                }
            )
            .matches(&p)
        );
        assert!(
            !r(
                "country",
                Range {
                    gt: Some(0.0),
                    ..Default::default()
                }
            )
            .matches(&p)
        );
        let both = Filter::And(vec![m("country", Value::String("fr".into())), m("age", Value::Integer(40))]);
        assert!(both.matches(&p));
        assert!(!Filter::Not(Box::new(both.clone())).matches(&p));
        assert!(Filter::Or(vec![m("age", Value::Integer(1)), both]).matches(&p));
    }

    #[test]
    fn validation_names_the_path() {
        let empty = Filter::And(vec![m("a", Value::Bool(true)), Filter::Or(vec![])]);
        assert!(empty.validate().unwrap_err().message.contains("filter.and[1].or is empty"));
        let mut deep = m("a", Value::Bool(true));
        for _ in 0..MAX_FILTER_DEPTH {
            deep = Filter::Not(Box::new(deep));
        }
        assert!(deep.validate().unwrap_err().message.contains("deeper"));
        assert!(r("a", Range::default()).validate().is_err());
        assert!(
            r(
                "a",
                Range {
                    lt: Some(f64::NAN),
                    ..Default::default()
                }
            )
            .validate()
            .is_err()
        );
    }
}
