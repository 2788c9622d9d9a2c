//! Evaluation of a parsed query over twin documents. Conditions are three-valued as in the
//! hub's SQL: a missing property, or a comparison between values of kinds that do not
//! order (objects, arrays, a string and a number), is *undefined*, and a row passes WHERE
//! only when the condition is true. Equality between primitives of different kinds is
//! false (and `!=` true).
//!
//! One deliberate leniency: twins carry `configurations.{id}.status` as `targeted` /
//! `applied` while the hub's own metric queries compare it with `'Applied'`; strings on
//! that path compare without regard to case so both spellings match.

use std::cmp::Ordering;

use serde_json::{Map, Value};

use super::{CmpOp, Expr, Literal, Operand, Path, Query, Select, SelectItem};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tri {
    True,
    False,
    Undefined,
}

impl From<bool> for Tri {
    fn from(b: bool) -> Tri {
        if b {
            Tri::True
        } else {
            Tri::False
        }
    }
}

/// The value at `path` in `doc`: exact key first, then a key differing only in case (the
/// hub's system properties answer to `LastActivityTime` as well as `lastActivityTime`).
pub fn lookup<'a>(doc: &'a Value, path: &Path) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in &path.0 {
        let obj = cur.as_object()?;
        cur = match obj.get(seg) {
            Some(v) => v,
            None => obj.iter().find(|(k, _)| k.eq_ignore_ascii_case(seg))?.1,
        };
    }
    Some(cur)
}

fn is_config_status(path: &Path) -> bool {
    path.0.len() == 3 && path.0[0].eq_ignore_ascii_case("configurations") && path.0[2] == "status"
}

fn literal_value(l: &Literal) -> Value {
    match l {
        Literal::Str(s) => Value::String(s.clone()),
        Literal::Num(n) => serde_json::Number::from_f64(*n).map_or(Value::Null, Value::Number),
        Literal::Bool(b) => Value::Bool(*b),
        Literal::Null => Value::Null,
    }
}

/// An operand's value (None: undefined) and whether strings compare ignoring case.
fn resolve(doc: &Value, op: &Operand) -> (Option<Value>, bool) {
    match op {
        Operand::Lit(l) => (Some(literal_value(l)), false),
        Operand::Path(p) => (lookup(doc, p).cloned(), is_config_status(p)),
    }
}

/// Equality of two primitives; None when either is not a primitive.
fn equal(a: &Value, b: &Value, fold_case: bool) -> Option<bool> {
    Some(match (a, b) {
        (Value::Object(_) | Value::Array(_), _) | (_, Value::Object(_) | Value::Array(_)) => {
            return None
        }
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::String(x), Value::String(y)) if fold_case => x.to_lowercase() == y.to_lowercase(),
        (x, y) => x == y,
    })
}

fn order(a: &Value, b: &Value, fold_case: bool) -> Option<Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) if fold_case => {
            Some(x.to_lowercase().cmp(&y.to_lowercase()))
        }
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        (Value::Bool(x), Value::Bool(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn compare(doc: &Value, l: &Operand, op: CmpOp, r: &Operand) -> Tri {
    let (a, fa) = resolve(doc, l);
    let (b, fb) = resolve(doc, r);
    let (Some(a), Some(b)) = (a, b) else {
        return Tri::Undefined;
    };
    let fold = fa || fb;
    let outcome = match op {
        CmpOp::Eq => equal(&a, &b, fold),
        CmpOp::Ne => equal(&a, &b, fold).map(|e| !e),
        CmpOp::Lt => order(&a, &b, fold).map(Ordering::is_lt),
        CmpOp::Gt => order(&a, &b, fold).map(Ordering::is_gt),
        CmpOp::Le => order(&a, &b, fold).map(Ordering::is_le),
        CmpOp::Ge => order(&a, &b, fold).map(Ordering::is_ge),
    };
    outcome.map_or(Tri::Undefined, Tri::from)
}

fn eval(doc: &Value, e: &Expr) -> Tri {
    match e {
        Expr::Compare(l, op, r) => compare(doc, l, *op, r),
        Expr::In {
            operand,
            list,
            negated,
        } => {
            let (v, fold) = resolve(doc, operand);
            let Some(v) = v else {
                return Tri::Undefined;
            };
            let mut found = Some(false);
            for item in list {
                match equal(&v, &literal_value(item), fold) {
                    Some(true) => {
                        found = Some(true);
                        break;
                    }
                    Some(false) => {}
                    None => found = None,
                }
            }
            found.map_or(Tri::Undefined, |f| Tri::from(f != *negated))
        }
        Expr::IsDefined(p) => Tri::from(lookup(doc, p).is_some()),
        Expr::Not(inner) => match eval(doc, inner) {
            Tri::True => Tri::False,
            Tri::False => Tri::True,
            Tri::Undefined => Tri::Undefined,
        },
        Expr::And(a, b) => match (eval(doc, a), eval(doc, b)) {
            (Tri::False, _) | (_, Tri::False) => Tri::False,
            (Tri::True, Tri::True) => Tri::True,
            _ => Tri::Undefined,
        },
        Expr::Or(a, b) => match (eval(doc, a), eval(doc, b)) {
            (Tri::True, _) | (_, Tri::True) => Tri::True,
            (Tri::False, Tri::False) => Tri::False,
            _ => Tri::Undefined,
        },
    }
}

impl Query {
    /// Whether `doc` passes the WHERE clause (no clause: every document does).
    pub fn matches(&self, doc: &Value) -> bool {
        self.filter
            .as_ref()
            .map_or(true, |f| eval(doc, f) == Tri::True)
    }

    /// The rows the query yields over `docs`, in the documents' order (groups in the
    /// order they are first seen), cut to `TOP n`.
    pub fn run<'a>(&self, docs: impl IntoIterator<Item = &'a Value>) -> Vec<Value> {
        let hits = docs.into_iter().filter(|d| self.matches(d));
        let mut rows: Vec<Value> = match &self.select {
            Select::All => hits.cloned().collect(),
            Select::Items(items) if self.aggregates() => self.aggregate(items, hits),
            Select::Items(items) => hits.map(|d| project(items, d, None)).collect(),
        };
        if let Some(top) = self.top {
            rows.truncate(top);
        }
        rows
    }

    fn aggregate<'a>(
        &self,
        items: &[SelectItem],
        hits: impl Iterator<Item = &'a Value>,
    ) -> Vec<Value> {
        // (group key, a representative document, count)
        let mut groups: Vec<(Vec<Option<Value>>, &Value, u64)> = Vec::new();
        for doc in hits {
            let key: Vec<Option<Value>> = self
                .group_by
                .iter()
                .map(|p| lookup(doc, p).cloned())
                .collect();
            match groups.iter_mut().find(|(k, _, _)| *k == key) {
                Some(g) => g.2 += 1,
                None => groups.push((key, doc, 1)),
            }
        }
        if groups.is_empty() && self.group_by.is_empty() {
            // COUNT() over nothing is one row saying 0.
            return vec![project(items, &Value::Null, Some(0))];
        }
        groups
            .into_iter()
            .map(|(_, doc, n)| project(items, doc, Some(n)))
            .collect()
    }
}

/// One row of a projection; `count` fills COUNT() items. Undefined values are left out.
fn project(items: &[SelectItem], doc: &Value, count: Option<u64>) -> Value {
    let mut row = Map::new();
    for (i, item) in items.iter().enumerate() {
        match item {
            SelectItem::Path { path, alias } => {
                if let Some(v) = lookup(doc, path) {
                    let name = alias.clone().unwrap_or_else(|| path.last().to_string());
                    row.insert(name, v.clone());
                }
            }
            SelectItem::Count { alias } => {
                let name = alias.clone().unwrap_or_else(|| format!("${}", i + 1));
                row.insert(name, Value::from(count.unwrap_or(0)));
            }
        }
    }
    Value::Object(row)
}
